"""GLM-4 (0414): the Llama decoder with partial GPT-J style rotary (partial_rotary_factor),
qkv bias, and RMSNorms after attention and after the MLP as well as before them. The checkpoint's
fused gate_up_proj loads as is."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM, NormNames


class Glm4ForCausalLM(LlamaForCausalLM):
    norm_names = NormNames("input_layernorm", "post_self_attn_layernorm",
                           "post_attention_layernorm", "post_mlp_layernorm")

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=getattr(config, "attention_bias", True), o_bias=False,
                                rope_neox=False)
