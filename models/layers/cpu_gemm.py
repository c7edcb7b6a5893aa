"""Dense GEMMs on CPU through oneDNN with weights packed once after loading.

torch's `F.linear` re-reads the weight in its plain layout every call; oneDNN's prepacked
layout (the one torch.compile's CPU backend uses) is 1.3x faster for batch-32 decode and about
2x for batch 1 on the project's machines (bench/README.md). Set OCTAVO_CPU_ONEDNN_LINEAR=0 to
fall back to `F.linear` for everything.

OCTAVO_CPU_LINEAR_KERNEL=1 (opt-in) keeps bf16 weights plain row-major instead: up to
MAX_KERNEL_ROWS rows go to octavo's own kernel (`ops.linear`, csrc/cpu/gemm.cpp: each weight
row streamed once for all rows, avx512_bf16 dot products), more rows to `F.linear` on the same
tensor, so there is still one copy of each weight (and the LM head no longer keeps a second,
packed copy beside its tied plain weight). Measured on the 2-core Zen 5 machines (100M Llama,
bf16, interleaved runs, medians): batch-8 TPOT 31.7 -> 23.1 ms, batch-1 TPOT unchanged (19.0 ms),
but 32-prompt throughput 508 -> 414 output tok/s, because `F.linear` is slower than the prepacked
oneDNN GEMM for 17..256 rows; hence opt-in. bench/kernels/linear.py has the per-shape numbers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from octavo import ops

_DTYPES = (torch.float32, torch.bfloat16)
# Crossover with F.linear / oneDNN measured by bench/kernels/linear.py (2-core Zen 5).
MAX_KERNEL_ROWS = 16


def enabled() -> bool:
    return (os.environ.get("OCTAVO_CPU_ONEDNN_LINEAR", "1") == "1"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def kernel_enabled(dtype: torch.dtype) -> bool:
    """Whether bf16 weights stay plain for octavo's own small-M kernel."""
    return (dtype == torch.bfloat16 and not ops.USING_NATIVE
            and os.environ.get("OCTAVO_CPU_LINEAR_KERNEL", "0") == "1")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The [out, in] CPU weight in its fast layout (plain for the bf16 kernel, else oneDNN-packed),
    or None where neither applies. A plain result shares the weight's storage when contiguous."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2 or not enabled():
        return None
    if kernel_enabled(weight.dtype):
        return weight.detach().contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [N, in] -> [N, out]
    if x.shape[0] == 0:
        return x.new_empty(0, packed.size(0))
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    if x.shape[0] <= MAX_KERNEL_ROWS and x.dim() == 2 and x.dtype == packed.dtype:
        return ops.linear(x if x.stride(-1) == 1 else x.contiguous(), packed, bias)
    return F.linear(x, packed, bias)


def linear_or_packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias) if packed is None else linear(x, packed, bias)
