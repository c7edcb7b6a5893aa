"""Qwen2-MoE: the Qwen2 decoder with a sparse MoE MLP (softmax router, top-k renormalised only
with norm_topk_prob) plus a shared expert scaled by sigmoid(shared_expert_gate); layers in
mlp_only_layers, and those off the decoder_sparse_step grid, keep a dense MLP."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.llama import AttentionOptions, LlamaMLP
from octavo.models.qwen2 import Qwen2ForCausalLM, layer_sliding_window


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule for Qwen2/3-MoE: experts unless listed in mlp_only_layers or off the
    decoder_sparse_step grid."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % step == 0)


def make_experts(config) -> FusedMoE:
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                    config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                    activation=moe_activation(config.hidden_act))


class Qwen2MoeForCausalLM(MoEWeightRouting, Qwen2ForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=getattr(config, "qkv_bias", True), o_bias=False,
                                sliding_window=layer_sliding_window(config, layer_idx))

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config)
        shared = None
        if getattr(config, "shared_expert_intermediate_size", 0):
            shared = LlamaMLP(config, intermediate_size=config.shared_expert_intermediate_size)
        return MoEBlock(config.hidden_size, make_experts(config), shared_expert=shared,
                        shared_expert_gate=shared is not None)
