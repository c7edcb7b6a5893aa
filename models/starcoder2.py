"""StarCoder2: the Llama attention (GQA, rotary, optional sliding window) with q/k/v/o biases,
LayerNorm with bias instead of RMSNorm, and a plain gelu MLP (c_fc -> act -> c_proj)."""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.activation import get_act_fn
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, add_and_norm


class Starcoder2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "use_bias", True)
        self.c_fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=bias)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config, opts: AttentionOptions, family):
        super().__init__()
        self.self_attn = family.make_attention(config, opts)
        self.mlp = Starcoder2MLP(config)
        self.input_layernorm = family.make_norm(config, config.hidden_size)
        self.post_attention_layernorm = family.make_norm(config, config.hidden_size)

    def forward(self, positions, hidden, residual, attn_metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = add_and_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden), residual


class Starcoder2ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Starcoder2DecoderLayer

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "use_bias", True)
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                sliding_window=getattr(config, "sliding_window", None))

    @staticmethod
    def make_norm(config, size: int) -> nn.Module:
        return LayerNorm(size, eps=config.norm_epsilon)
