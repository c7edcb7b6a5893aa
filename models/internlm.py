"""InternLM (v1, remote code): Llama names and math with multi-head attention (no kv-head field),
biases on q/k/v/o when `bias` is set (InternLMConfig's default), none in the MLP, and the rotary
base in the `rotary` dict. Its "dynamic" rotary type only changes the base past
max_position_embeddings, which max_model_len never exceeds, so it runs as the plain one."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM

ROTARY_TYPES = ("origin", "dynamic")


class InternLMForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        rotary = getattr(config, "rotary", None) or {}
        kind = rotary.get("type", "origin")
        if kind not in ROTARY_TYPES:
            raise ValueError(f"InternLM rotary type {kind!r} is not supported; use one of "
                             f"{', '.join(ROTARY_TYPES)}")
        if "base" in rotary:  # in both spellings rope_parameters() reads
            config.rope_theta = float(rotary["base"])
            config.rope_parameters = {"rope_type": "default", "rope_theta": float(rotary["base"])}
        super().__init__(config)

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "bias", True)
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        return getattr(config, "hidden_act", "silu"), False
