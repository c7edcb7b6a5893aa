"""Dense GEMMs on CPU with weights packed once after loading, into the layout their kernel runs
fastest on.

- bf16: octavo's own layout and kernel (`ops.linear_packed`, csrc/cpu/gemm.cpp): 64-output panels
  of K pairs, read front to back, avx512_bf16 dot products; one kernel for every row count.
  On the 2-core Zen 5 machines (100M Llama, runs interleaved with oneDNN prepacked) it is about
  15-30% faster at batch 1 and level at batch 32 (bench/README.md, 2026-12-01 set); per GEMM it
  is on par with oneDNN for 8..64 rows and 10-25% slower at 2048 rows (bench/kernels/linear.py). Used only on CPUs with avx512_bf16 (elsewhere oneDNN stays);
  OCTAVO_CPU_LINEAR_KERNEL=0 goes back to oneDNN for bf16.
- fp32: oneDNN's prepacked layout (the one torch.compile's CPU backend uses), 1.3x faster than
  `F.linear` for batch-32 decode and about 2x for batch 1 (bench/README.md).
Either packed copy replaces the plain weight in linear layers (one copy in memory; the LM head
keeps its plain weight beside the packed one for a tied embedding, as before). Set
OCTAVO_CPU_ONEDNN_LINEAR=0 to fall back to plain `F.linear` for everything.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from octavo import ops, ops_native

_DTYPES = (torch.float32, torch.bfloat16)


class PanelWeight(NamedTuple):
    """A bf16 weight [n, K] in ops_native.pack_linear_panels' layout, for ops.linear_packed."""
    data: torch.Tensor  # [ceil(n/64), ceil(K/2), 64, 2]
    n: int


def enabled() -> bool:
    return (os.environ.get("OCTAVO_CPU_ONEDNN_LINEAR", "1") == "1"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def _best_is_avx2() -> bool:
    # torch's dispatch level (ATEN_CPU_CAPABILITY lowers it), the one octavo's kernels use too
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


@functools.cache
def _has_avx512_bf16() -> bool:
    # the kernel's generic path (any other CPU) is correct but far slower than oneDNN
    if os.environ.get("ATEN_CPU_CAPABILITY") in ("default", "avx2") or os.environ.get("OCTAVO_CPU_NO_AVX512BF16"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@functools.cache
def _onednn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def kernel_enabled(dtype: torch.dtype) -> bool:
    """Whether weights of this dtype go to octavo's own kernel rather than oneDNN / F.linear."""
    return (dtype == torch.bfloat16 and not ops.USING_NATIVE and (_has_avx512_bf16() or _best_is_avx2())
            and os.environ.get("OCTAVO_CPU_LINEAR_KERNEL", "1") == "1")


def pack(weight: torch.Tensor) -> torch.Tensor | PanelWeight | None:
    """The [out, in] CPU weight in its fast layout, or None where none applies."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2 or not enabled():
        return None
    if kernel_enabled(weight.dtype):
        return PanelWeight(ops_native.pack_linear_panels(weight.detach()), weight.shape[0])
    if weight.dtype == torch.bfloat16 and not _onednn_bf16():
        return None        # oneDNN's bf16 GEMM needs AVX-512 (or AVX-NE-CONVERT): plain F.linear
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)


def linear(x: torch.Tensor, packed: torch.Tensor | PanelWeight, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [N, in] -> [N, out]
    if isinstance(packed, PanelWeight):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = ops.linear_packed(x2, packed.data, packed.n, bias) if x2.shape[0] else x2.new_empty(0, packed.n)
        return out.view(*x.shape[:-1], packed.n)
    if x.shape[0] == 0:
        return x.new_empty(0, packed.size(0))
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def linear_or_packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | PanelWeight | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias) if packed is None else linear(x, packed, bias)
