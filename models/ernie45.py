"""Ernie 4.5 (dense): the Llama decoder with GPT-J style (interleaved) rotary and one `use_bias`
switch for the attention and MLP projections."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = bool(getattr(config, "use_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, rope_neox=False)

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        return config.hidden_act, bool(getattr(config, "use_bias", False))
