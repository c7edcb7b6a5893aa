"""Weight loaders for checkpoint layouts that differ from octavo's [out, in] fused q|k|v:
GPT-2's Conv1D ([in, out]), q/k/v interleaved per head (BLOOM, multi-head GPTBigCode) or per kv
head group (InternLM2), and row-normalised heads (Baichuan 2).

Each wraps a parameter's existing `weight_loader`, so tensor-parallel sharding still happens
in the wrapped loader, after the layout is fixed.
"""
from __future__ import annotations

import torch
from torch import nn


def load_transposed(layer: nn.Module) -> None:
    """The checkpoint stores `layer.weight` as [in, out] (transformers' Conv1D)."""
    inner = layer.weight.weight_loader

    def loader(param, loaded_weight: torch.Tensor, shard_id=None):
        return inner(param, loaded_weight.t(), shard_id)

    layer.weight.weight_loader = loader


def load_interleaved_qkv(layer: nn.Module, num_heads: int, head_size: int) -> None:
    """The checkpoint's fused qkv weight/bias is ordered [head, (q|k|v), head_size] on the output
    dim; regroup it into [q heads | k heads | v heads] and load it as a whole (shard_id None)."""
    load_grouped_qkv(layer, num_heads, num_heads, head_size)


def load_grouped_qkv(layer: nn.Module, num_heads: int, num_kv_heads: int, head_size: int) -> None:
    """The checkpoint's fused qkv weight/bias is ordered [kv head, (its num_heads / num_kv_heads
    q heads | k | v), head_size] on the output dim (InternLM2's wqkv; with as many kv heads as
    heads, BLOOM's per-head q|k|v); regroup it into [q heads | k heads | v heads] and load it as a
    whole (shard_id None)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    rows = (num_heads + 2 * num_kv_heads) * head_size
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        inner = param.weight_loader

        def loader(p, loaded_weight: torch.Tensor, shard_id=None, inner=inner):
            if shard_id is not None:
                raise ValueError("a grouped qkv checkpoint tensor is loaded whole")
            rest = loaded_weight.shape[1:]
            if loaded_weight.shape[0] != rows:
                raise ValueError(f"fused qkv of shape {tuple(loaded_weight.shape)} should have "
                                 f"{rows} rows")
            grouped = loaded_weight.reshape(num_kv_heads, group + 2, head_size, *rest)
            q = grouped[:, :group].reshape(num_heads * head_size, *rest)
            k = grouped[:, group].reshape(num_kv_heads * head_size, *rest)
            v = grouped[:, group + 1].reshape(num_kv_heads * head_size, *rest)
            return inner(p, torch.cat([q, k, v]))

        param.weight_loader = loader


def load_row_normalized(layer: nn.Module) -> None:
    """The model uses `layer.weight` with every row scaled to unit L2 norm (Baichuan 2's NormHead
    normalises its lm_head once, at the first forward in eval mode); normalise as it loads."""
    inner = layer.weight.weight_loader

    def loader(param, loaded_weight: torch.Tensor, shard_id=None):
        normed = torch.nn.functional.normalize(loaded_weight.float(), dim=-1)
        return inner(param, normed.to(loaded_weight.dtype), shard_id)

    layer.weight.weight_loader = loader
