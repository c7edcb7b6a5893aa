"""IQuest-Coder-V1 Loop (remote code, IQuestLoopCoderForCausalLM): the Llama decoder stack run
`loop_num` (2) times over the same weights, with no norm between passes. Pass 1 is causal
attention. In each later pass every layer's query attends twice, globally over pass 1's K/V of that
layer and locally over its own pass's K/V within the last `loop_window_size` tokens, mixed per head
by a learned gate on the rotated query: g = sigmoid(q_h . w_h + b_h), g * global + (1 - g) * local.

The paged cache holds every pass's K/V: each decoder layer has one Attention module (one cache
layer) per pass, all on the request's one block table, so the runner allocates
loop_num * num_hidden_layers cache layers. Pass 1 writes and reads its own; a later pass writes its
local K/V and reads pass 1's cache of the same layer without writing it. Every cached entry of a
token depends only on the tokens up to it, so prefix caching, chunked prefill and decode work as
for any decoder.
"""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.attention import Attention
from octavo.models.layers.linear import default_weight_loader
from octavo.models.layers.parallel_state import get_tp_rank, get_tp_size
from octavo.models.llama import (AttentionOptions, LlamaAttention, LlamaDecoderLayer,
                                 LlamaForCausalLM, add_and_norm, head_dim_of)


def _loop_settings(config) -> tuple[int, int]:
    loop_num = getattr(config, "loop_num", None)
    window = getattr(config, "loop_window_size", None)
    loop_num = 2 if loop_num is None else loop_num              # IQuestLoopCoderConfig's defaults
    window = 64 if window is None else window
    if int(loop_num) != loop_num or loop_num < 1:
        raise ValueError(f"loop_num must be a positive whole number (got {loop_num})")
    if int(window) != window or window < 1:
        raise ValueError(f"loop_window_size must be a positive whole number (got {window})")
    return int(loop_num), int(window)


def _load_head_rows(param: nn.Parameter, loaded: torch.Tensor) -> None:
    # [total_heads, ...] in the checkpoint -> this rank's contiguous heads
    n = param.shape[0]
    if loaded.shape[0] != n * get_tp_size():
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} should have "
                         f"{n * get_tp_size()} rows (one per attention head)")
    default_weight_loader(param, loaded.narrow(0, get_tp_rank() * n, n))


class LoopGate(nn.Module):
    """The gate of one layer: weight [heads, head_dim] and bias [heads] (checkpoint names
    model.gate_projections.<layer>.weight / .bias), split by heads across ranks."""

    def __init__(self, total_num_heads: int, head_dim: int):
        super().__init__()
        if total_num_heads % get_tp_size():
            raise ValueError(f"num_attention_heads ({total_num_heads}) is not divisible by the "
                             f"tensor parallel size ({get_tp_size()})")
        heads = total_num_heads // get_tp_size()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads))
        self.weight.weight_loader = self.bias.weight_loader = _load_head_rows

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        # q: [T, H * hd] rotated queries -> gate [T, H, 1]
        q = q.view(q.shape[0], *self.weight.shape)
        return torch.sigmoid(torch.einsum("thd,hd->th", q, self.weight) + self.bias).unsqueeze(-1)


class LoopAttention(LlamaAttention):
    """LlamaAttention plus one sliding-window Attention (cache layer) per later pass."""

    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__(config, opts, family)
        loop_num, window = _loop_settings(config)
        self.local_attns = nn.ModuleList(
            Attention(self.num_heads, self.head_dim, self.attn.scale, self.num_kv_heads,
                      sliding_window=window) for _ in range(loop_num - 1))

    def forward(self, positions, hidden, attn_metadata, loop_idx: int = 0,
                gate: LoopGate | None = None, kv1=None):
        """Pass `loop_idx` of this layer -> (output [T, hidden], pass-1 (k, v) or None). Pass 1
        returns its k, v only when there is no KV cache (profiling), for the later passes'
        global attention to use; with a cache they read pass 1's cache layer instead."""
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hk) * hd]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if loop_idx == 0:
            return self.o_proj(self.attn(q, k, v, attn_metadata)), \
                (None if self.attn.has_cache else (k, v))
        k1, v1 = kv1 if kv1 is not None else (None, None)
        glob = self.attn(q, k1, v1, attn_metadata)             # [T, Hq * hd]
        local = self.local_attns[loop_idx - 1](q, k, v, attn_metadata)
        g = gate(q)                                            # [T, Hq, 1]
        shape = (q.shape[0], self.num_heads, self.head_dim)
        mixed = g * glob.view(shape) + (1 - g) * local.view(shape)
        return self.o_proj(mixed.flatten(1)), None


class LoopDecoderLayer(LlamaDecoderLayer):
    def forward(self, positions, hidden, residual, attn_metadata, loop_idx: int = 0,
                gate: LoopGate | None = None, kv1=None):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden, kv = self.self_attn(positions, hidden, attn_metadata, loop_idx, gate, kv1)
        hidden, residual = add_and_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden), residual, kv


class IQuestLoopCoderForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = LoopDecoderLayer
    # stages run one after another once per step; a second pass over stage 0's layers after
    # the last stage would need the hidden state sent back: not done (tensor parallel works)
    supports_pipeline_parallel = False
    pipeline_parallel_limit = "every pass runs the whole layer stack again"

    def __init__(self, config):
        self.loop_num, self.loop_window_size = _loop_settings(config)
        super().__init__(config)
        self.model.gate_projections = nn.ModuleList(
            LoopGate(config.num_attention_heads, head_dim_of(config))
            for _ in range(config.num_hidden_layers))

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        return LoopAttention(config, opts, cls)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size]
        m = self.model
        hidden, residual = m.embed_tokens(input_ids), None
        kv1 = []
        for layer in m.layers:
            hidden, residual, kv = layer(positions, hidden, residual, attn_metadata)
            kv1.append(kv)
        # the residual stream (hidden + residual) flows into the next pass un-normalised
        for loop_idx in range(1, self.loop_num):
            for layer, gate, kv in zip(m.layers, m.gate_projections, kv1):
                hidden, residual, _ = layer(positions, hidden, residual, attn_metadata,
                                            loop_idx, gate, kv)
        hidden, _ = add_and_norm(m.norm, hidden, residual)
        return hidden
