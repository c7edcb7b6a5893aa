"""Phi-3.5-MoE: the Llama decoder with LayerNorms (with bias), optional attention and lm_head
biases, an optional sliding window, LongRoPE as transformers applies it here (short factors,
short_mscale), and a sparse MoE MLP routed by SparseMixer (inference form,
always two experts: the best one, then the best of the rest, each weighted by a softmax over the
experts within a relative `router_jitter_noise` margin of it)."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from octavo.models.layers.embedding import ParallelLMHead
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.llama import AttentionOptions, LlamaForCausalLM


def _masked_choice(scores: torch.Tensor, candidates: torch.Tensor, jitter_eps: float):
    # the best candidate, and its softmax weight over the candidates within the margin of it
    best, index = candidates.max(-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    gates = candidates.masked_fill((best - scores) / factor > 2 * jitter_eps, float("-inf"))
    return gates.softmax(-1).gather(-1, index), index


def sparsemixer_routing(router_logits: torch.Tensor, top_k: int,
                        jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # router_logits [T, E] -> (weights [T, 2] fp32, ids [T, 2] int32), as transformers' eval path
    if top_k != 2:
        raise ValueError(f"PhimoeForCausalLM routes to exactly 2 experts (SparseMixer); "
                         f"num_experts_per_tok is {top_k}")
    scores = router_logits.float()
    w1, first = _masked_choice(scores, scores, jitter_eps)
    w2, second = _masked_choice(scores, scores.scatter(-1, first, float("-inf")), jitter_eps)
    return torch.cat([w1, w2], -1), torch.cat([first, second], -1).to(torch.int32)


def _short_factors_only(config):
    """transformers' PhiMoE builds its LongRoPE frequencies without a sequence length, so always
    from short_factor, and scales cos/sin by short_mscale (long_mscale once the batch passes
    original_max_position_embeddings; Phi-3.5-MoE has the two equal). A copy of the config whose
    long table equals the short one and whose scale is short_mscale gives that here."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not params or params.get("rope_type", params.get("type")) not in ("longrope", "su"):
        return config
    config = copy.deepcopy(config)
    params = {**params, "long_factor": params["short_factor"],
              "attention_factor": params.get("short_mscale")}
    if getattr(config, "rope_parameters", None):
        config.rope_parameters = params
    else:
        config.rope_scaling = params
    return config


class PhimoeForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.router\.", ".mlp.gate."))
    expert_projections = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def __init__(self, config):
        super().__init__(_short_factors_only(config))
        if getattr(config, "lm_head_bias", False):
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True)
            if getattr(config, "tie_word_embeddings", False):
                self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                sliding_window=getattr(config, "sliding_window", None))

    @staticmethod
    def make_norm(config, size: int) -> nn.Module:
        return LayerNorm(size, eps=config.rms_norm_eps)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        routing = functools.partial(sparsemixer_routing, jitter_eps=config.router_jitter_noise)
        experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok,
                           config.hidden_size, config.intermediate_size,
                           activation=moe_activation(config.hidden_act), routing_fn=routing)
        return MoEBlock(config.hidden_size, experts)
