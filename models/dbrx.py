"""DBRX: a Llama-shaped decoder under DBRX's names (transformer.blocks.<i>.norm_attn_norm.{norm_1,
attn.Wqkv, attn.out_proj, norm_2}, ffn.{router.layer, experts.mlp.w1/v1/w2}), LayerNorm without
bias, fused Wqkv clamped to [-clip_qkv, clip_qkv], and a sparse MoE MLP whose top-k softmax
weights are divided by their p-norm (moe_normalize_expert_weights). Each expert projection is one
tensor for all experts, [E * I, H]; w2 holds the down projections transposed."""
from __future__ import annotations

import functools

import torch
from torch import nn

from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, NormNames


def pnorm_routing(router_logits: torch.Tensor, top_k: int, p: float):
    # softmax, top-k, weights / ||weights||_p: [T, E] -> (weights [T, k] fp32, ids [T, k] int32)
    top, ids = router_logits.float().softmax(-1).topk(top_k, -1)
    return top / top.norm(p=p, dim=-1, keepdim=True), ids.to(torch.int32)


class DbrxForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    packed_modules_mapping = {}
    norm_names = NormNames("norm_1", None, "norm_2", None)
    checkpoint_renames = (
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.norm_f\.", "model.norm."),
        (r"^transformer\.blocks\.", "model.layers."),
        (r"\.norm_attn_norm\.attn\.Wqkv\.", ".self_attn.qkv_proj."),
        (r"\.norm_attn_norm\.attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.norm_attn_norm\.norm_", ".norm_"),
        (r"\.ffn\.router\.layer\.", ".mlp.gate."),
        (r"\.ffn\.experts\.", ".mlp.experts."),
    )
    stacked_projections = {"mlp.w1": "w1", "mlp.v1": "w3", "mlp.w2": "w2_t"}

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(clip_qkv=config.attn_config.clip_qkv)

    @staticmethod
    def make_norm(config, size: int) -> nn.Module:
        return LayerNorm(size, eps=1e-5, bias=False)  # nn.LayerNorm's default eps

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        ffn = config.ffn_config
        p = ffn.moe_normalize_expert_weights
        # p = 1 is topk_routing's renormalisation (the weights are positive); other p in Python
        routing = functools.partial(pnorm_routing, p=float(p)) if p not in (None, 1) else None
        experts = FusedMoE(ffn.moe_num_experts, ffn.moe_top_k, config.hidden_size,
                           ffn.ffn_hidden_size, renormalize=p is not None, routing_fn=routing,
                           activation=moe_activation((ffn.ffn_act_fn or {}).get("name", "silu")))
        return MoEBlock(config.hidden_size, experts)
