"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before rotary, no qkv bias
(unless attention_bias), and Qwen2's per-layer sliding window rule."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM
from octavo.models.qwen2 import layer_sliding_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True,
                                sliding_window=layer_sliding_window(config, layer_idx))
