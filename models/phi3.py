"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder with q|k|v and gate|up already fused in the
checkpoint (qkv_proj, gate_up_proj load whole and split by their weight loaders), an optional
sliding window, partial rotary, and LongRoPE scaling (models/layers/longrope.py)."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(sliding_window=getattr(config, "sliding_window", None))
