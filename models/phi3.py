"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder with q|k|v and gate|up already fused in the
checkpoint (qkv_proj, gate_up_proj load whole and split by their weight loaders), an optional
sliding window, partial rotary, and LongRoPE scaling (models/layers/longrope.py)."""
from __future__ import annotations

import torch

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.longrope import LongRoPEScaledRotaryEmbedding
from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(sliding_window=getattr(config, "sliding_window", None))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        rope = self.model.layers[0].self_attn.rotary_emb  # one shared module for all layers
        if isinstance(rope, LongRoPEScaledRotaryEmbedding):  # rows of the short or long table
            positions = rope.rope_positions(positions, attn_metadata.query_start_loc,
                                            attn_metadata.seq_lens)
        return self.model(input_ids, positions, attn_metadata)
