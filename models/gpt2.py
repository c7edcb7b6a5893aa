"""GPT-2: learned absolute positions, pre-LayerNorm blocks, a plain gelu MLP and a head tied
to the token embedding. GPTBigCode (gpt_bigcode.py) is this model with nn.Linear weights and
multi-query attention.

Checkpoint weights are transformers' Conv1D ([in, out]); their loaders transpose them.
"""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.activation import get_act_fn
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.checkpoint_layouts import load_interleaved_qkv, load_transposed
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                         RowParallelLinear)
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.layers.position import LearnedPositionEmbedding


class GPT2Attention(nn.Module):
    conv1d = True  # weights stored [in, out]

    @staticmethod
    def kv_layout(config) -> tuple[int, bool]:
        """(kv heads, whether c_attn rows are interleaved per head as [head, q|k|v, hd])"""
        return config.num_attention_heads, False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        hd = hidden // total_heads
        total_kv_heads, interleaved = self.kv_layout(config)
        self.c_attn = QKVParallelLinear(hidden, hd, total_heads, total_kv_heads, bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        if self.conv1d:
            load_transposed(self.c_attn)
            load_transposed(self.c_proj)
        if interleaved:
            load_interleaved_qkv(self.c_attn, total_heads, hd)
        self.q_size, self.kv_size = self.c_attn.q_size, self.c_attn.kv_size
        scale = hd ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.c_attn.num_heads, hd, scale, self.c_attn.num_kv_heads)

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.c_proj(self.attn(q, k, v, attn_metadata))


class GPT2MLP(nn.Module):
    conv1d = True

    def __init__(self, config):
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        if self.conv1d:
            load_transposed(self.c_fc)
            load_transposed(self.c_proj)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    attention_cls, mlp_cls = GPT2Attention, GPT2MLP

    def __init__(self, config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps)
        self.attn = self.attention_cls(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps)
        self.mlp = self.mlp_cls(config)

    def forward(self, hidden, residual, attn_metadata):
        # the residual stream rides along in the norms: ln(x, residual) adds before normalizing
        if residual is None:
            residual, hidden = hidden, self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden, residual = self.ln_2(self.attn(hidden, attn_metadata), residual)
        return self.mlp(hidden), residual


class GPT2Model(nn.Module):
    def __init__(self, config, block_cls=GPT2Block):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = StageLayers(config.num_hidden_layers, lambda i: block_cls(config, i))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        # between pipeline stages: (hidden, residual), as in the Llama decoder
        return run_stage(self.h, intermediate,
                         embed=lambda: (self.wte(input_ids) + self.wpe(positions), None),
                         step=lambda block, state: block(*state, attn_metadata),
                         finish=lambda state: self.ln_f(*state)[0])


class GPT2LMHeadModel(nn.Module):
    block_cls = GPT2Block

    def __init__(self, config):
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is an "
                             "encoder-decoder model; octavo runs decoder-only models")
        self.config = config
        self.transformer = GPT2Model(config, self.block_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_to(self.transformer.wte)

    supports_pipeline_parallel = True
    pp_intermediate_tensors = 2          # (hidden, residual)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] (on a pipeline stage but
        # the last: (hidden, residual))
        return self.transformer(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab] float32
        return self.lm_head.compute_logits(hidden)
