"""Cohere Command-R: a parallel block (attention and MLP read the same LayerNorm output and are
added to the residual together), LayerNorm without bias, GPT-J style rotary, logits times
logit_scale, and optional per-head q/k LayerNorm with a weight for every head (use_qk_norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo.models.layers.layernorm import LayerNorm
from octavo.models.layers.linear import default_weight_loader
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.llama import (AttentionOptions, LlamaDecoderLayer, LlamaForCausalLM, NormNames,
                                 add_and_norm)


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm (no bias) over each head_dim slice of [T, heads * head_dim], one weight per head."""

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        if get_tp_size() > 1:
            raise ValueError("CohereForCausalLM with use_qk_norm does not support tensor "
                             "parallelism yet; use tensor_parallel_size=1")
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(-1, self.num_heads, self.head_dim).float()
        out = F.layer_norm(heads, (self.head_dim,), None, None, self.eps) * self.weight.float()
        return out.to(x.dtype).view(x.shape)


class CohereDecoderLayer(LlamaDecoderLayer):
    def forward(self, positions, hidden, residual, attn_metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        return self.self_attn(positions, hidden, attn_metadata) + self.mlp(hidden), residual


class CohereForCausalLM(LlamaForCausalLM):
    norm_names = NormNames("input_layernorm", None, None, None)
    decoder_layer_cls = CohereDecoderLayer

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, rope_neox=False,
                                qk_norm=bool(getattr(config, "use_qk_norm", False)))

    @staticmethod
    def make_norm(config, size: int) -> LayerNorm:
        return LayerNorm(size, eps=config.layer_norm_eps, bias=False)

    @staticmethod
    def make_qk_norm(config, num_heads: int, head_dim: int) -> HeadwiseLayerNorm:
        return HeadwiseLayerNorm(num_heads, head_dim, config.layer_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.config.logit_scale
