"""Dense GEMMs on CPU through oneDNN with weights packed once after loading.

torch's `F.linear` re-reads the weight in its plain layout every call; oneDNN's prepacked
layout (the one torch.compile's CPU backend uses) is 1.3x faster for batch-32 decode and about
2x for batch 1 on the project's machines (bench/README.md). Set OCTAVO_CPU_ONEDNN_LINEAR=0 to
fall back to `F.linear`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    return (os.environ.get("OCTAVO_CPU_ONEDNN_LINEAR", "1") == "1"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a [out, in] CPU weight, or None where it does not apply."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2 or not enabled():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [N, in] -> [N, out]
    if x.shape[0] == 0:
        return x.new_empty(0, packed.size(0))
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def linear_or_packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias) if packed is None else linear(x, packed, bias)
