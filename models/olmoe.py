"""OLMoE: the Llama decoder with RMSNorm on the whole q and k projections (across heads) before
rotary, optional clip_qkv, and a sparse MoE MLP on every layer (softmax router, top-k
renormalised only with norm_topk_prob)."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class OlmoeForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True,
                                clip_qkv=getattr(config, "clip_qkv", None))

    @staticmethod
    def make_qk_norm(config, num_heads: int, head_dim: int) -> RMSNorm:
        if get_tp_size() > 1:  # the norm spans all heads, which tensor parallelism splits
            raise ValueError("OlmoeForCausalLM does not support tensor parallelism yet "
                             "(its q/k norm spans all heads); use tensor_parallel_size=1")
        return RMSNorm(num_heads * head_dim, eps=config.rms_norm_eps)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        experts = FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                           config.intermediate_size, renormalize=bool(config.norm_topk_prob),
                           activation=moe_activation(config.hidden_act))
        return MoEBlock(config.hidden_size, experts)
