"""Dense GEMMs on CPU with weights packed once after loading, into the layout their kernel runs
fastest on.

- bf16: octavo's own layout and kernel (`ops.linear_packed`, csrc/cpu/gemm.cpp): 64-output panels
  of K pairs, read front to back; one kernel for every row count.
  * avx512_bf16 CPUs: vdpbf16ps dot products. On the 2-core Zen 5 machines (100M Llama, runs
    interleaved with oneDNN prepacked) about 15-30% faster at batch 1 and level at batch 32
    (bench/README.md, 2026-12-01 set); per GEMM on par with oneDNN for 8..64 rows and 10-25%
    slower at 2048 rows (bench/kernels/linear.py).
  * CPUs whose best level is AVX2 (no AVX-512, so no oneDNN bf16 GEMM; the alternative is plain
    `F.linear`): the AVX2 path widens the bf16 pairs with a shift and a mask and FMAs them in fp32.
    2-core AVX2-only EPYC, 2026-12-02, every run under a load average of 6-10 from other jobs, so
    figures are relative only: per GEMM (2048x5632 and 5632x2048, weights cycled through 256 MiB)
    1.0-1.9x F.linear at 1-2 rows, 1.6-3.1x at 4-32 rows, 3.4-4x at 300 rows; llama-medium (853M)
    `octavo bench latency` batch 1, 16 in / 16 out, 3 runs each alternated: TPOT median 568 ms vs
    920 ms with OCTAVO_CPU_LINEAR_KERNEL=0 (0.62x), TTFT 2.2 s vs 8.3 s (0.26x).
  OCTAVO_CPU_LINEAR_KERNEL=0 goes back to oneDNN (F.linear without AVX-512) for bf16.
- fp32: oneDNN's prepacked layout (the one torch.compile's CPU backend uses), 1.3x faster than
  `F.linear` for batch-32 decode and about 2x for batch 1 (bench/README.md). The packed kernel
  takes fp32 panels too (AVX2: 4 outputs x a K pair per vector against broadcast x pairs), but on
  the AVX2-only EPYC it was level with oneDNN at 1-8 rows (within the noise of a loaded machine)
  and 0.5-0.76x oneDNN at 300 rows, so fp32 stays with oneDNN for every row count (one weight copy).
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

from octavo import ops

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
    # AVX-512 CPUs without it run the AVX2 path, slower than oneDNN's AVX-512 bf16 GEMM there
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


def pack(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor | PanelWeight | None:
    """The [out, in] CPU weight in its fast layout, or None where none applies. in_place: the
    caller drops the plain weight afterwards, so octavo's panels may overwrite its memory (one
    copy of the weight at load, no fresh pages to fault in; ops.can_pack_in_place says when)."""
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2 or not enabled():
        return None
    if kernel_enabled(weight.dtype):
        return PanelWeight(ops.pack_linear_panels(weight.detach(), in_place), weight.shape[0])
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
