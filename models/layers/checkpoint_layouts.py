"""Weight loaders for checkpoint layouts that differ from octavo's [out, in] fused q|k|v:
GPT-2's Conv1D ([in, out]) and per-head interleaved q/k/v (BLOOM, multi-head GPTBigCode).

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
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        inner = param.weight_loader

        def loader(p, loaded_weight: torch.Tensor, shard_id=None, inner=inner):
            if shard_id is not None:
                raise ValueError("an interleaved qkv checkpoint tensor is loaded whole")
            rest = loaded_weight.shape[1:]
            if loaded_weight.shape[0] != 3 * num_heads * head_size:
                raise ValueError(f"fused qkv of shape {tuple(loaded_weight.shape)} should have "
                                 f"{3 * num_heads * head_size} rows")
            grouped = loaded_weight.reshape(num_heads, 3, head_size, *rest).transpose(0, 1)
            return inner(p, grouped.reshape(3 * num_heads * head_size, *rest))

        param.weight_loader = loader
