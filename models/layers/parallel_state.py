"""Tensor- and pipeline-parallel ranks seen by the layers (rank 0 of 1 until a worker sets them).

A worker (octavo.distributed.worker) calls `set_tensor_parallel(rank, size, group)` and
`set_pipeline_parallel(rank, size)` after torch.distributed is initialised and before it builds
the model; the layers read the ranks and call the collectives below, and a model builds only
the layers of `pp_layer_range(num_layers)`.
"""
from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None
_PP_RANK = 0
_PP_SIZE = 1


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


def set_pipeline_parallel(rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"pipeline parallel rank {rank} is out of range for size {size}")
    global _PP_RANK, _PP_SIZE
    _PP_RANK, _PP_SIZE = rank, size


def get_pp_rank() -> int:
    return _PP_RANK


def get_pp_size() -> int:
    return _PP_SIZE


def pp_layer_range(num_layers: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """[start, end) of the layers pipeline stage `rank` (default: this one) builds; the layer
    count must divide (EngineConfig checks it with the model's numbers)."""
    rank = _PP_RANK if rank is None else rank
    size = _PP_SIZE if size is None else size
    if num_layers % size:
        raise ValueError(f"{num_layers} layers do not divide into {size} pipeline stages")
    per = num_layers // size
    return rank * per, (rank + 1) * per
