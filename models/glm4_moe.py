"""GLM-4.5 / 4.6 / 4.7 (Glm4MoeForCausalLM): the Llama decoder with neox-style partial rotary,
optional per-head q/k RMSNorm (use_qk_norm) and qkv bias (attention_bias); dense MLPs on the
first first_k_dense_replace layers, then a sparse MoE MLP: an fp32 sigmoid router choosing on
scores + e_score_correction_bias within the topk_group best of n_group groups (each scored by
its two best experts), weights renormalised (norm_topk_prob) and times routed_scaling_factor,
plus always-on shared experts. The checkpoint's MTP layers (index num_hidden_layers and up)
are not used and are skipped by the loader."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, LlamaMLP


class Glm4MoeForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    checkpoint_renames = (
        (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.experts.e_score_correction_bias"),
        (r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
    )

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=getattr(config, "attention_bias", False), o_bias=False,
                                qk_norm=bool(getattr(config, "use_qk_norm", False)))

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        if layer_idx < config.first_k_dense_replace:
            return LlamaMLP(config)
        experts = FusedMoE(config.n_routed_experts, config.num_experts_per_tok,
                           config.hidden_size, config.moe_intermediate_size,
                           scoring="sigmoid", renormalize=bool(config.norm_topk_prob),
                           score_bias=True, n_group=config.n_group or 1,
                           topk_group=config.topk_group or 1, group_score="top2_sum",
                           routed_scaling_factor=config.routed_scaling_factor,
                           activation=moe_activation(config.hidden_act))
        shared = None
        if config.n_shared_experts:
            shared = LlamaMLP(config, intermediate_size=config.moe_intermediate_size
                              * config.n_shared_experts)
        return MoEBlock(config.hidden_size, experts, shared_expert=shared, router_fp32=True)
