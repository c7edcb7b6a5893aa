"""Per-layer cache specs: each layer that keeps a cache declares what one block of it holds, so
the model runner sizes one pool of blocks from all layers' specs without knowing the layer kinds.

A kind is a spec class (`shapes` of the tensors of `num_blocks` blocks) and a layer that takes
those tensors (`CacheLayer.bind_cache`). Paged K/V (`PagedKVSpec`) and the paged MLA latent
(`PagedLatentSpec`: one vector per token) are paged; a fixed per-request state (`StateSpec`:
Mamba's conv and SSM states) is held in slots, one per running request, instead of blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class CacheSpec:
    """What one layer stores: tensors of shape `shapes(num_blocks, block_size)`."""

    def shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def page_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block of this layer's cache."""
        elt = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for s in self.shapes(1, block_size)) * elt

    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty(s, dtype=dtype, device=device)
                     for s in self.shapes(num_blocks, block_size))


@dataclass(frozen=True)
class PagedKVSpec(CacheSpec):
    """K and V, each [num_blocks, block_size, num_kv_heads, head_size], in `dtype` (None: the
    model dtype; torch.float8_e4m3fn for kv_cache_dtype="fp8")."""
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype | None = None

    def shapes(self, num_blocks, block_size):
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_size)
        return [shape, shape]

    def page_bytes(self, block_size, dtype):
        return super().page_bytes(block_size, self.dtype or dtype)

    def allocate(self, num_blocks, block_size, dtype, device):
        return super().allocate(num_blocks, block_size, self.dtype or dtype, device)


@dataclass(frozen=True)
class PagedLatentSpec(CacheSpec):
    """One vector per token shared by all heads, [num_blocks, block_size, latent_size]: MLA's
    compressed kv latent followed by its rotary key (kv_lora_rank + qk_rope_head_dim)."""
    latent_size: int

    def shapes(self, num_blocks, block_size):
        return [(num_blocks, block_size, self.latent_size)]


@dataclass(frozen=True)
class StateSpec(CacheSpec):
    """A fixed-size state per request, whatever its length: tensors [num_slots, *shape], one
    slot per running request. `shapes_per_slot[i]` has dtype `dtypes[i]` (None: the model
    dtype). Mamba: conv state [conv_dim, width - 1] in the model dtype, SSM state in fp32."""
    shapes_per_slot: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype | None, ...]

    def shapes(self, num_blocks, block_size):
        raise TypeError("a StateSpec holds slots, not blocks: use slot_bytes / allocate_slots")

    def page_bytes(self, block_size, dtype):
        return 0

    def slot_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one request's state in this layer."""
        return sum(math.prod(s) * torch.empty((), dtype=d or dtype).element_size()
                   for s, d in zip(self.shapes_per_slot, self.dtypes))

    def allocate_slots(self, num_slots: int, dtype: torch.dtype,
                       device: torch.device | str) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros((num_slots, *s), dtype=d or dtype, device=device)
                     for s, d in zip(self.shapes_per_slot, self.dtypes))


class CacheLayer:
    """Mixin of the modules that own a cache: the runner finds them by this type, allocates
    `cache_spec().allocate(...)` and hands the tensors over with `bind_cache` (None: no cache)."""

    def cache_spec(self) -> CacheSpec:
        raise NotImplementedError

    def bind_cache(self, caches: tuple[torch.Tensor, ...] | None) -> None:
        raise NotImplementedError
