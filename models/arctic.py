"""Snowflake Arctic (ArcticForCausalLM, remote code): the Mixtral decoder in which every
moe_layer_frequency-th layer is sparse (softmax top-k, renormalised when top_k > 1) and the others
have a dense MLP (block_sparse_moe.mlp.w1 / w3 / w2). With parallel_attn_mlp_res a sparse layer
also holds a dense residual MLP (hidden_size wide, with its own residual_layernorm) beside the
MoE, and the MoE runs in parallel with attention, reading the layer's input:

    y = x + attn(norm_in(x))
    out = y + residual_mlp(norm_res(y)) + moe(norm_post(x))
"""
from __future__ import annotations

from torch import nn

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.llama import (AttentionOptions, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                 MistralForCausalLM, add_and_norm)


def is_moe_layer(config, layer_idx: int) -> bool:
    return (layer_idx + 1) % (getattr(config, "moe_layer_frequency", 1) or 1) == 0


class ArcticDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__(config, opts, family)
        self.parallel_residual = (is_moe_layer(config, opts.layer_idx)
                                  and bool(getattr(config, "parallel_attn_mlp_res", False)))
        if self.parallel_residual:
            self.residual_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.residual_mlp = LlamaMLP(config, intermediate_size=config.hidden_size)

    def forward(self, positions, hidden, residual, attn_metadata: AttentionMetadata):
        if not self.parallel_residual:
            return super().forward(positions, hidden, residual, attn_metadata)
        normed, x = add_and_norm(self.input_layernorm, hidden, residual)   # x: the layer input
        moe = self.mlp(self.post_attention_layernorm(x))    # before x is updated in place below
        attn = self.self_attn(positions, normed, attn_metadata)
        normed, y = self.residual_layernorm(attn, x)                        # y = x + attn
        return self.residual_mlp(normed) + moe, y


class ArcticForCausalLM(MoEWeightRouting, MistralForCausalLM):
    decoder_layer_cls = ArcticDecoderLayer
    packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping,
                              "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1)}
    checkpoint_renames = (
        (r"\.block_sparse_moe\.mlp\.", ".mlp."),          # a dense layer's MLP
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.(mlp|residual_mlp)\.w2\.weight$", r".\1.down_proj.weight"),
    )
    expert_projections = {"w1": "w1", "w3": "w3", "w2": "w2"}

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        if not is_moe_layer(config, layer_idx):
            return LlamaMLP(config)
        top_k = config.num_experts_per_tok
        experts = FusedMoE(config.num_local_experts, top_k, config.hidden_size,
                           config.intermediate_size, renormalize=top_k > 1,
                           activation=moe_activation(config.hidden_act))
        return MoEBlock(config.hidden_size, experts)
