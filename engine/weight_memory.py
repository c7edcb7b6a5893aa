"""Model weights on transparent huge pages (CPU).

A decode step streams every weight once. On 4 KiB pages each 4 KiB of a weight costs a TLB
miss, and under a hypervisor a miss walks two page tables (the guest's and the host's): on the
2-core Zen 4 KVM guest the batch-32 decode GEMM ran at 344-357 GFLOP/s on cold weights on 4 KiB
pages and at 404-413 on 2 MiB ones, and small Llama's 32 x 128/128 throughput rose 3-10%
(bench/README.md, 2026-12-05). So while a model is built, every large CPU `torch.empty` (the
parameters the checkpoint is then copied into, and octavo's bf16 panels are packed into in
place) is carved from anonymous mappings advised `MADV_HUGEPAGE` instead of malloc's heap, and
`empty` gives weights made after loading (panels packed out of place, MoE experts) a mapping
of their own.
The price is paid at load, where a huge page's first touch can cost more than 512 small ones
(in that guest up to ~1.5 s a GB more: small's 268 MB loaded up to 0.4 s slower, medium's 1.7 GB
up to 1.8 s, when the host had taken the memory back).

Where the kernel runs THP as `madvise` or `always` this puts the weights on huge pages; with
`never`, or on other systems, the mappings are plain anonymous memory. OCTAVO_HUGE_PAGE_WEIGHTS=0
turns it off (weights from malloc, as torch allocates them).
"""
from __future__ import annotations

import math
import mmap
import os
import weakref

import torch
from torch.overrides import TorchFunctionMode

HUGE_PAGE = 2 << 20
MIN_BYTES = 1 << 20            # smaller tensors stay with malloc (norms, biases, small embeddings)
_ALIGN = 4096                  # every tensor starts on its own 4 KiB page
_CHUNK = 256 << 20             # virtual address space reserved at a time


def enabled() -> bool:
    return (os.environ.get("OCTAVO_HUGE_PAGE_WEIGHTS", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")
            and hasattr(mmap, "MAP_PRIVATE"))


class _Chunk:
    """One private anonymous mapping of at least `nbytes` usable from a 2 MiB boundary, handed out
    front to back. Each tensor made from it holds a reference to the mapping, which is unmapped
    once the last of them is freed; a tensor freed before (a checkpoint weight that was repacked
    into another tensor after loading) gives its pages back at once. Past the last whole 2 MiB
    the mapping keeps 4 KiB pages, so a tail never costs a whole huge page."""

    def __init__(self, nbytes: int) -> None:
        nbytes = -(-nbytes // _ALIGN) * _ALIGN
        self.map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
        base = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()
        self.next = (-base) % HUGE_PAGE      # the first 2 MiB boundary: huge pages line up from it
        self.end = self.next + nbytes
        whole = self.next + nbytes // HUGE_PAGE * HUGE_PAGE
        if whole > self.next:
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE, self.next, whole - self.next)
            except OSError:          # a kernel without THP (EINVAL): plain pages, same mapping
                pass

    def take(self, nbytes: int) -> torch.Tensor | None:
        start = -(-self.next // _ALIGN) * _ALIGN
        if start + nbytes > self.end:
            return None
        self.next = start + nbytes
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        view = memoryview(self.map)[start:start + nbytes]
        out = torch.frombuffer(view, dtype=torch.uint8)    # the storage holds `view` until freed
        done = weakref.finalize(view, _release, self.map, start, nbytes)
        done.atexit = False
        return out


def _release(mapping: mmap.mmap, start: int, nbytes: int) -> None:
    """Drop the pages of a freed tensor (start is page-aligned, its last page its own)."""
    if not mapping.closed:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, start, -(-nbytes // _ALIGN) * _ALIGN)
        except OSError:              # kept until the whole mapping goes
            pass


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor for a weight made after loading (packed panels), on a huge-page
    mapping of its own when it spans a huge page at least and huge-page weights are on; else
    `torch.empty`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not enabled():
        return torch.empty(shape, dtype=dtype)
    try:
        return _Chunk(nbytes).take(nbytes).view(dtype).view(shape)
    except OSError:
        return torch.empty(shape, dtype=dtype)


class HugePageWeights(TorchFunctionMode):
    """`with HugePageWeights(): model = cls(config)`: CPU `torch.empty` calls of MIN_BYTES or
    more, strided and contiguous, come from huge-page chunks (only `empty`: its memory is
    undefined anyway, so nothing about the module's initial values changes)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk: _Chunk | None = None
        self.bytes = 0

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        flat = self.chunk.take(nbytes) if self.chunk is not None else None
        if flat is None:
            self.chunk = _Chunk(max(_CHUNK, nbytes))   # OSError when refused: see __torch_function__
            flat = self.chunk.take(nbytes)
        self.bytes += nbytes
        return flat.view(dtype).view(shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            shape = _shape(args)
            if shape is not None and _plain(kwargs):
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                device = torch.device(kwargs.get("device") or torch.get_default_device())
                if device.type == "cpu" and math.prod(shape) * dtype.itemsize >= MIN_BYTES:
                    try:
                        out = self._alloc(shape, dtype)
                    except OSError:          # a mapping refused (overcommit limits): malloc's
                        self.chunk = None
                        return func(*args, **kwargs)
                    return out.requires_grad_() if kwargs.get("requires_grad") else out
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self.chunk = None            # the mapping lives on in the tensors made from it
        return super().__exit__(*exc)


def _shape(args: tuple) -> tuple[int, ...] | None:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        args = tuple(args[0])
    if args and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in args):
        return tuple(args)
    return None


def _plain(kwargs: dict) -> bool:
    """No argument but dtype / device / requires_grad, or their defaults."""
    for key, value in kwargs.items():
        if key in ("dtype", "device", "requires_grad"):
            continue
        if key == "layout" and value in (None, torch.strided):
            continue
        if key == "memory_format" and value in (None, torch.contiguous_format):
            continue
        if key == "pin_memory" and not value:
            continue
        return False
    return True
