"""ERNIE 4.5 MoE (text): the Ernie 4.5 decoder (GPT-J style rotary, one use_bias switch) with a
sparse MoE MLP on layers moe_layer_start_index..moe_layer_end_index every moe_layer_interval:
an fp32 softmax router whose experts are chosen on scores + e_score_correction_bias (stored in
moe_statics) and weighted by the renormalised unbiased scores, plus always-on shared experts."""
from __future__ import annotations

from torch import nn

from octavo.models.ernie45 import Ernie4_5ForCausalLM
from octavo.models.layers.embedding import ParallelLMHead
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.llama import LlamaMLP


def is_moe_layer(config, layer_idx: int) -> bool:
    end = config.moe_layer_end_index
    end = config.num_hidden_layers - 1 if end is None or end < 0 else end
    return ((layer_idx + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= layer_idx <= end)


class Ernie4_5_MoeForCausalLM(MoEWeightRouting, Ernie4_5ForCausalLM):
    checkpoint_renames = (
        (r"\.mlp\.(gate\.)?moe_statics\.e_score_correction_bias$",
         ".mlp.experts.e_score_correction_bias"),
        (r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
    )

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "use_bias", False):  # the lm_head has a bias too
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True)
            if getattr(config, "tie_word_embeddings", False):
                self.lm_head.tie_to(self.model.embed_tokens)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        bias = bool(getattr(config, "use_bias", False))
        if not is_moe_layer(config, layer_idx):
            return LlamaMLP(config, bias=bias)
        experts = FusedMoE(config.moe_num_experts, config.moe_k, config.hidden_size,
                           config.moe_intermediate_size, score_bias=True,
                           activation=moe_activation(config.hidden_act))
        shared = None
        if config.moe_num_shared_experts:
            shared = LlamaMLP(config, bias=bias, intermediate_size=config.moe_intermediate_size
                              * config.moe_num_shared_experts)
        return MoEBlock(config.hidden_size, experts, shared_expert=shared, router_fp32=True)
