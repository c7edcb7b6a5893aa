"""Granite MoE (3.0/3.1 MoE) and Granite MoE Shared: Granite's muP multipliers
(models/granite.py) around a sparse MoE MLP (top-k of the router logits, softmax over those k:
softmax with renormalisation), experts stored stacked as block_sparse_moe.input_linear
[E, 2I, H] and output_linear [E, H, I]; the Shared variant adds a dense shared_mlp
(input_linear [2S, H] = gate | up, output_linear) beside the experts."""
from __future__ import annotations

from torch import nn

from octavo.models.granite import GraniteForCausalLM
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.llama import LlamaMLP

# checkpoint names (and transformers 5's own: router.weight, experts.gate_up_proj / down_proj)
_RENAMES = (
    (r"\.block_sparse_moe\.router\.(layer\.)?", ".mlp.gate."),
    (r"\.block_sparse_moe\.input_linear\.weight$", ".mlp.experts.gate_up_proj"),
    (r"\.block_sparse_moe\.output_linear\.weight$", ".mlp.experts.down_proj"),
    (r"\.block_sparse_moe\.experts\.", ".mlp.experts."),
    (r"\.shared_mlp\.input_linear\.", ".mlp.shared_expert.gate_up_proj."),
    (r"\.shared_mlp\.output_linear\.", ".mlp.shared_expert.down_proj."),
)


class GraniteMoeForCausalLM(MoEWeightRouting, GraniteForCausalLM):
    checkpoint_renames = _RENAMES

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok,
                           config.hidden_size, config.intermediate_size,
                           activation=moe_activation(config.hidden_act))
        shared_size = getattr(config, "shared_intermediate_size", 0)
        shared = LlamaMLP(config, intermediate_size=shared_size) if shared_size else None
        return MoEBlock(config.hidden_size, experts, shared_expert=shared)


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    pass
