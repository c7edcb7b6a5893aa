"""Zamba2 (Zyphra): a stack of Mamba-2 layers where the "hybrid" layers first run one of
`num_mem_blocks` shared transformer blocks (attention + gated MLP over the concatenation of the
hidden state and the original embeddings) and add its projected output to the Mamba input.

The shared blocks' weights are stored once (`model.shared_blocks`); every use of a block has
its own KV cache (an `Attention` held by the hybrid layer) and its own LoRA-like adapters on
q/k/v and gate_up (indexed by the use's position among the hybrid layers, as transformers does).
Checkpoints name each use's copy `model.layers.<i>.shared_transformer.*`; `route_weight` sends
them to the block they tie to (hybrid use k -> block k % num_mem_blocks). transformers ties the
blocks only when `tie_word_embeddings` is set (released checkpoints set it); without it every
use keeps weights of its own, and so does octavo (one block per use).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from octavo.models.layers.activation import get_gated_activation
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                         QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
from octavo.models.layers.mamba import Mamba2Mixer
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.layers.rotary import get_rope, rope_parameters
from octavo.models.loader import _route

HYBRID, MAMBA = "hybrid", ("mamba", "linear_attention")


def _adapter(size_in: int, rank: int, up: nn.Module) -> nn.Sequential:
    # checkpoint names <list>.<use>.0.weight (down) and .1.weight (up); the down projection is
    # whole on every rank, the up one split as the projection it adds to
    return nn.Sequential(ReplicatedLinear(size_in, rank), up)


def _adapters(uses: int, owned, size_in: int, rank: int, make_up) -> nn.ModuleList:
    """One adapter per hybrid use this block serves (Identity placeholders keep the indices)."""
    return nn.ModuleList(_adapter(size_in, rank, make_up()) if owned(i) else nn.Identity()
                         for i in range(uses))


def _local_heads(config) -> tuple[int, int]:
    """(query heads, KV heads) of one tensor-parallel rank, as QKVParallelLinear splits them."""
    tp = get_tp_size()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return heads // tp, max(kv_heads // tp, 1)


class Zamba2SharedAttention(nn.Module):
    """q/k/v over [hidden | embeddings] (2H wide), heads of 2H / num_heads, softmax scale
    (head_dim / 2) ** -0.5; the attention itself (and its cache) belongs to each use. Tensor
    parallel as Llama's: heads (and the adapters' outputs) split, o_proj all-reduced."""

    def __init__(self, config, owned, uses: int):
        super().__init__()
        width, hd = config.attention_hidden_size, config.attention_head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(width, hd, heads, kv_heads, bias=False)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(heads * hd, config.hidden_size)
        self.use_adapters = bool(config.use_shared_attention_adapter)
        if self.use_adapters:
            if kv_heads * hd != width or heads * hd != width:
                raise ValueError("Zamba2 shared attention adapters need num_key_value_heads == "
                                 f"num_attention_heads (got {kv_heads} and {heads})")
            rank = config.adapter_rank
            up = lambda: ColumnParallelLinear(rank, width)  # noqa: E731
            self.linear_q_adapter_list = _adapters(uses, owned, width, rank, up)
            self.linear_k_adapter_list = _adapters(uses, owned, width, rank, up)
            self.linear_v_adapter_list = _adapters(uses, owned, width, rank, up)

    def forward(self, use: int, positions, x, attn: Attention, rotary, md) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.use_adapters:
            q = q + self.linear_q_adapter_list[use](x)
            k = k + self.linear_k_adapter_list[use](x)
            v = v + self.linear_v_adapter_list[use](x)
        if rotary is not None:
            q, k = rotary(positions, q.contiguous(), k.contiguous())
        return self.o_proj(attn(q, k, v, md))


class Zamba2SharedMLP(nn.Module):
    """gate_up_proj (one checkpoint tensor) plus the use's adapter, gated activation, down_proj;
    tensor parallel as Llama's MLP (each rank its share of the gate and of the up halves)."""

    def __init__(self, config, owned, uses: int):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        bias = config.add_bias_linear
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)
        up = lambda: MergedColumnParallelLinear(config.adapter_rank, [inter, inter])  # noqa: E731
        self.gate_up_proj_adapter_list = _adapters(uses, owned, hidden, config.adapter_rank, up)
        self.act_fn = get_gated_activation(config.hidden_act)

    def forward(self, use: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[use](x)
        return self.down_proj(self.act_fn(gate_up))


class Zamba2SharedBlock(nn.Module):
    """transformers' Zamba2AttentionDecoderLayer: norm(2H) -> attention -> norm(H) -> MLP, no
    residual inside (the hybrid layer adds the result to the Mamba input)."""

    def __init__(self, config, block_id: int, uses: int):
        super().__init__()
        owned = lambda i: i % config.num_mem_blocks == block_id  # noqa: E731
        self.input_layernorm = RMSNorm(config.attention_hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Zamba2SharedAttention(config, owned, uses)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = Zamba2SharedMLP(config, owned, uses)

    def forward(self, use: int, positions, hidden, original, attn, rotary, md) -> torch.Tensor:
        x = self.input_layernorm(torch.cat([hidden, original], dim=-1))
        x = self.self_attn(use, positions, x, attn, rotary, md)
        return self.feed_forward(use, self.pre_ff_layernorm(x))


def _mamba_mixer(config) -> Mamba2Mixer:
    names = SimpleNamespace(hidden_size=config.hidden_size)   # hidden_act is the MLP's (gelu)
    # transformers clamps dt from below at time_step_min (on its prefill path; here always)
    return Mamba2Mixer(names, num_heads=config.n_mamba_heads, head_dim=config.mamba_headdim,
                       n_groups=config.mamba_ngroups, state_size=config.mamba_d_state,
                       conv_kernel=config.mamba_d_conv, chunk_size=config.chunk_size,
                       intermediate_size=int(config.mamba_expand * config.hidden_size),
                       use_bias=config.add_bias_linear, use_conv_bias=True, norm_eps=1e-5,
                       time_step_limit=(config.time_step_min, float("inf")))


class Zamba2MambaLayer(nn.Module):
    """Pre-norm Mamba-2 block; a hybrid layer's shared-block output joins its input."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = _mamba_mixer(config)

    def forward(self, hidden, md, extra: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden if extra is None else hidden + extra
        return hidden + self.mamba(self.input_layernorm(x), md)


class Zamba2HybridLayer(nn.Module):
    """One use of a shared block: its own KV cache and output `linear`, then a Mamba layer."""

    def __init__(self, config, use: int, block_id: int):
        super().__init__()
        self.use, self.block_id = use, block_id
        hd = config.attention_head_dim
        heads, kv_heads = _local_heads(config)
        self.attn = Attention(heads, hd, (hd / 2) ** -0.5, kv_heads)
        self.rotary_emb = None
        if config.use_mem_rope:
            base, scaling = rope_parameters(config)
            self.rotary_emb = get_rope(hd, hd, config.max_position_embeddings, base,
                                       is_neox_style=True, rope_scaling=scaling)
        self.linear = ReplicatedLinear(config.hidden_size, config.hidden_size)
        self.mamba_decoder = Zamba2MambaLayer(config)

    def forward(self, positions, hidden, original, md, shared_blocks) -> torch.Tensor:
        block = shared_blocks[self.block_id]
        out = block(self.use, positions, hidden, original, self.attn, self.rotary_emb, md)
        return self.mamba_decoder(hidden, md, self.linear(out))


def _layer_kinds(config) -> list[str]:
    kinds = list(config.layers_block_type)
    for i, kind in enumerate(kinds):
        if kind != HYBRID and kind not in MAMBA:
            raise ValueError(f"Zamba2 layer {i} has unknown type {kind!r} (expected 'hybrid' or "
                             "'mamba' / 'linear_attention')")
    return kinds


def _num_blocks(config, uses: int) -> int:
    tied = getattr(config, "tie_word_embeddings", False)
    return min(config.num_mem_blocks, uses) if tied else uses


def _block_of_use(config, use: int) -> int:
    return use % config.num_mem_blocks if getattr(config, "tie_word_embeddings", False) else use


class Zamba2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        kinds = _layer_kinds(config)
        uses = kinds.count(HYBRID)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        mem = config.num_mem_blocks
        self.shared_blocks = nn.ModuleList(Zamba2SharedBlock(config, b % mem, uses)
                                           for b in range(_num_blocks(config, uses)))
        layers, use = [], 0
        for kind in kinds:
            if kind == HYBRID:
                layers.append(Zamba2HybridLayer(config, use, _block_of_use(config, use)))
                use += 1
            else:
                layers.append(Zamba2MambaLayer(config))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, md: AttentionMetadata) -> torch.Tensor:
        original = self.embed_tokens(input_ids)
        hidden = original
        for layer in self.layers:
            if isinstance(layer, Zamba2HybridLayer):
                hidden = layer(positions, hidden, original, md, self.shared_blocks)
            else:
                hidden = layer(hidden, md)
        return self.final_layernorm(hidden)


class Zamba2ForCausalLM(nn.Module):
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                              "v_proj": ("qkv_proj", "v")}
    # tensor parallel: the Mamba mixers run whole on every rank (each rank keeps the whole
    # state), the shared blocks and the vocabulary are split; pipeline stages would each need
    # the request's state slots (and the shared blocks)
    supports_tensor_parallel = True
    pipeline_parallel_limit = "its Mamba layers keep a per-request state"
    supports_pipeline_parallel = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Zamba2Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)
        hybrid = [i for i, kind in enumerate(_layer_kinds(config)) if kind == HYBRID]
        # checkpoint layer index of each use -> the shared block it ties to
        self._block_of_layer = {layer: _block_of_use(config, use)
                                for use, layer in enumerate(hybrid)}

    def route_weight(self, name: str):
        m = re.fullmatch(r"model\.layers\.(\d+)\.shared_transformer\.(.+)", name)
        if m is None or int(m.group(1)) not in self._block_of_layer:
            return None
        # tied: every use's copy holds the same tensors, each loads into the one block
        block = self._block_of_layer[int(m.group(1))]
        return _route(f"model.shared_blocks.{block}.{m.group(2)}", self.packed_modules_mapping)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size]
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
