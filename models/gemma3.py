"""Gemma 3 (text): Gemma 2's decoder with per-head (1 + w) RMSNorm on q and k, a separate rotary
base for the sliding-window layers (rope_parameters["sliding_attention"]) and no attention
soft-capping (transformers ignores attn_logit_softcapping for Gemma 3)."""
from __future__ import annotations

from octavo.models.gemma2 import Gemma2ForCausalLM, is_sliding
from octavo.models.llama import AttentionOptions


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        sliding = is_sliding(config, layer_idx)
        return AttentionOptions(
            qkv_bias=bias, o_bias=bias, qk_norm=True, scale=config.query_pre_attn_scalar ** -0.5,
            sliding_window=config.sliding_window if sliding else None,
            rope_layer_type=config.layer_types[layer_idx])
