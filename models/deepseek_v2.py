"""DeepSeek-V2 (and V2-Lite, without q_lora) and DeepSeek-V3 / R1: the Llama decoder with
multi-head latent attention (models/layers/mla.py: the cache holds the kv latent and the rotary
key per token) and sparse MoE MLPs after the first `first_k_dense_replace` dense layers, with
always-on shared experts.

Routing: V2 scores with a softmax and takes the top-k, within the topk_group best of n_group
groups (each scored by its best expert) when topk_method is group_limited_greedy; V3 scores
with a sigmoid and chooses on scores + e_score_correction_bias within the topk_group best groups
(each scored by its two best experts), weights renormalised (norm_topk_prob); both multiply the
weights by routed_scaling_factor. Rotary: GPT-J pairs (V2; V3 unless rope_interleave is off),
yarn with mscale, whose mscale_all_dim also enters the softmax scale as mscale^2.

V3 checkpoints carry multi-token-prediction layers (index num_hidden_layers and up,
num_nextn_predict_layers of them): the model's loader skips them (it logs how many tensors it
ignored); speculative_config={"method": "mtp", ...} runs the first as a draft head
(models/deepseek_mtp.py)."""
from __future__ import annotations

import math

from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.mla import MultiHeadLatentAttention
from octavo.models.layers.rotary import rope_parameters
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, LlamaMLP


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(config) -> float:
    """qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)^2 where the rope has one."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, scaling = rope_parameters(config)
    if scaling and scaling.get("rope_type", "default") != "default":
        mscale_all_dim = scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = _yarn_mscale(scaling["factor"], mscale_all_dim)
            scale *= m * m
    return scale


class DeepseekV2ForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    # q_proj (V2-Lite) is a projection of its own, not a shard of a fused qkv
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    checkpoint_renames = (
        (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.experts.e_score_correction_bias"),
        (r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
    )

    @staticmethod
    def rope_neox(config) -> bool:
        return False

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        return MultiHeadLatentAttention(config, rope_neox=cls.rope_neox(config),
                                        scale=mla_softmax_scale(config))

    @staticmethod
    def routing(config) -> dict:
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        return dict(scoring="softmax", renormalize=bool(getattr(config, "norm_topk_prob", False)),
                    n_group=(config.n_group or 1) if grouped else 1,
                    topk_group=(config.topk_group or 1) if grouped else 1, group_score="max")

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        freq = getattr(config, "moe_layer_freq", 1) or 1
        if layer_idx < config.first_k_dense_replace or layer_idx % freq:
            return LlamaMLP(config, bias=bool(getattr(config, "mlp_bias", False)))
        routing = cls.routing(config)
        experts = FusedMoE(config.n_routed_experts, config.num_experts_per_tok,
                           config.hidden_size, config.moe_intermediate_size,
                           routed_scaling_factor=config.routed_scaling_factor,
                           activation=moe_activation(config.hidden_act), **routing)
        shared = None
        if config.n_shared_experts:
            shared = LlamaMLP(config, intermediate_size=config.moe_intermediate_size
                              * config.n_shared_experts)
        return MoEBlock(config.hidden_size, experts, shared_expert=shared, router_fp32=True)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def rope_neox(config) -> bool:
        return not getattr(config, "rope_interleave", True)

    @staticmethod
    def routing(config) -> dict:
        return dict(scoring="sigmoid", renormalize=bool(config.norm_topk_prob), score_bias=True,
                    n_group=config.n_group or 1, topk_group=config.topk_group or 1,
                    group_score="top2_sum")
