"""Tensor-parallel rank and size seen by the layers (rank 0 of 1 until a runner sets them).

The runner calls `set_tensor_parallel(rank, size, group)` after torch.distributed is initialised;
the layers only read `get_tp_rank()` / `get_tp_size()` and call the two collectives below.
"""
from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None


def set_tensor_parallel(rank: int, size: int, group=None) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor parallel rank {rank} is out of range for size {size}")
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, size, group


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    # Sum of x over the tensor-parallel group (in place); identity on one rank.
    if _TP_SIZE == 1:
        return x
    torch.distributed.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # Concatenation of every rank's x along dim; identity on one rank.
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
