"""Per-layer cache specs: each layer that keeps a cache declares what one block of it holds, so
the model runner sizes one pool of blocks from all layers' specs without knowing the layer kinds.

A kind is a spec class (`shapes` of the tensors of `num_blocks` blocks) and a layer that takes
those tensors (`CacheLayer.bind_cache`). Paged K/V (`PagedKVSpec`) and the paged MLA latent
(`PagedLatentSpec`: one vector per token) exist; a fixed per-request state (Mamba) is a third.
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
    """K and V, each [num_blocks, block_size, num_kv_heads, head_size]."""
    num_kv_heads: int
    head_size: int

    def shapes(self, num_blocks, block_size):
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_size)
        return [shape, shape]


@dataclass(frozen=True)
class PagedLatentSpec(CacheSpec):
    """One vector per token shared by all heads, [num_blocks, block_size, latent_size]: MLA's
    compressed kv latent followed by its rotary key (kv_lora_rank + qk_rope_head_dim)."""
    latent_size: int

    def shapes(self, num_blocks, block_size):
        return [(num_blocks, block_size, self.latent_size)]


class CacheLayer:
    """Mixin of the modules that own a cache: the runner finds them by this type, allocates
    `cache_spec().allocate(...)` and hands the tensors over with `bind_cache` (None: no cache)."""

    def cache_spec(self) -> CacheSpec:
        raise NotImplementedError

    def bind_cache(self, caches: tuple[torch.Tensor, ...] | None) -> None:
        raise NotImplementedError
