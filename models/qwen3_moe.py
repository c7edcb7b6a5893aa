"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm) with Qwen2-MoE's sparse MLP without the
shared expert; mlp_only_layers / decoder_sparse_step keep some layers dense."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.fused_moe import MoEBlock, MoEWeightRouting
from octavo.models.llama import AttentionOptions, LlamaMLP
from octavo.models.qwen2_moe import is_sparse_layer, make_experts
from octavo.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(MoEWeightRouting, Qwen3ForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        # transformers slides every layer when use_sliding_window is set (no max_window_layers)
        bias = getattr(config, "attention_bias", False)
        window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config)
        return MoEBlock(config.hidden_size, make_experts(config))
