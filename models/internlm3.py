"""InternLM3 (remote code): Llama names and math; `qkv_bias` puts biases on q/k/v, `bias` on
o_proj and the MLP's three projections."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class InternLM3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=getattr(config, "qkv_bias", False),
                                o_bias=getattr(config, "bias", False))

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        return getattr(config, "hidden_act", "silu"), getattr(config, "bias", False)
