"""Mixtral: the Mistral decoder (optional sliding window) with a sparse MoE MLP on every layer:
softmax router, top-k renormalised, SiLU-gated experts (checkpoint: block_sparse_moe.gate and
block_sparse_moe.experts.<e>.w1 / w3 / w2, or transformers 5's stacked mlp.experts)."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.llama import MistralForCausalLM


class MixtralForCausalLM(MoEWeightRouting, MistralForCausalLM):
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."),)
    expert_projections = {"w1": "w1", "w3": "w3", "w2": "w2"}

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok,
                           config.hidden_size, config.intermediate_size,
                           activation=moe_activation(config.hidden_act))
        return MoEBlock(config.hidden_size, experts)
