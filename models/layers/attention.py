"""Paged attention layer: write this step's K/V into the block cache, then attend through it.

The model runner builds one AttentionMetadata per step and binds `k_cache` / `v_cache`
([num_blocks, block_size, num_kv_heads, head_size], as its PagedKVSpec says) on every Attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from octavo import ops, ops_native
from octavo.models.layers.cache_spec import CacheLayer, PagedKVSpec
from octavo.models.layers.custom_op import CustomOp


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64, -1 for padding
    query_start_loc: torch.Tensor   # [S+1] int32
    seq_lens: torch.Tensor          # [S] int32, context length including this step's tokens
    block_table: torch.Tensor       # [S, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # models with a per-request state (Mamba): each sequence's slot, and False on a sequence's
    # first chunk (its state starts from zeros); None for models without one
    state_indices: torch.Tensor | None = None       # [S] int32
    has_initial_state: torch.Tensor | None = None   # [S] bool


class Attention(CustomOp, CacheLayer):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, sliding_window: int | None = None,
                 logit_soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None):
        super().__init__()
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        self.sliding_window = sliding_window or 0
        self.logit_soft_cap = logit_soft_cap or 0.0
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.float()  # [Hq] fp32
        # [num_blocks, block_size, Hk, hd], set by the runner; None/empty: no cache yet
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # the cache's dtype when it differs from the model's (kv_cache_dtype="fp8": set by the
        # runner; the kernels quantize on write and read the bytes back)
        self.kv_cache_dtype: torch.dtype | None = None
        # an fp8 cache stores K / k_scale and V / v_scale (vLLM's per-layer scales): 1.0, the
        # checkpoint's (loader.py), or calculated from the first batch's K and V when
        # calculate_kv_scales is set (pending until then); other caches ignore them
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.calculate_kv_scales = False

    @property
    def has_cache(self) -> bool:
        return self.k_cache is not None and self.k_cache.numel() > 0

    def cache_spec(self) -> PagedKVSpec:
        return PagedKVSpec(self.num_kv_heads, self.head_size, self.kv_cache_dtype)

    # counts bind_cache calls over all layers: what holds the caches (decoder_plan.py) rebuilds
    cache_bindings: int = 0

    def bind_cache(self, caches: tuple[torch.Tensor, ...] | None) -> None:
        self.k_cache, self.v_cache = caches if caches is not None else (None, None)
        Attention.cache_bindings += 1

    def _forward(self, impl, q, k, v, attn_metadata: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq*hd]; k, v: [T, Hk*hd] (views of a fused qkv are fine) -> [T, Hq*hd].
        # k = v = None: attend over the cache as an earlier call of this step left it, writing
        # nothing (a second query over the same K/V: IQuest-Coder Loop's second pass).
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_size)
        if k is not None:
            k = k.view(num_tokens, self.num_kv_heads, self.head_size)
            v = v.view(num_tokens, self.num_kv_heads, self.head_size)
        if not self.has_cache:  # no cache (profiling): prompts only
            if k is None:
                raise RuntimeError("Attention without a KV cache needs this step's k and v")
            return _attention_without_cache(impl, q, k, v, attn_metadata, self).flatten(1)
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(q.device)
        if k is not None:
            if self.calculate_kv_scales:
                self._calculate_kv_scales(k, v, attn_metadata.slot_mapping)
            impl.reshape_and_cache(k, v, self.k_cache, self.v_cache, attn_metadata.slot_mapping,
                                   self.k_scale, self.v_scale)
        out = impl.paged_attention(q, self.k_cache, self.v_cache, attn_metadata.query_start_loc,
                                   attn_metadata.seq_lens, attn_metadata.block_table, self.scale,
                                   self.sliding_window, self.logit_soft_cap, slopes,
                                   k_scale=self.k_scale, v_scale=self.v_scale)
        return out.view(num_tokens, self.num_heads * self.head_size)

    # vLLM's calculate_kv_scales: the largest |K| of the first batch maps to 200 and the largest
    # |V| to 100 (of e4m3's 448), leaving headroom for later tokens (beyond it they saturate)
    K_SCALE_CONSTANT = 200.0
    V_SCALE_CONSTANT = 100.0

    def _calculate_kv_scales(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        rows = slots >= 0                      # padding rows hold no token
        if not bool(rows.any()):
            return
        k_max = float(k[rows].float().abs().amax())
        v_max = float(v[rows].float().abs().amax())
        if math.isfinite(k_max) and k_max > 0:
            self.k_scale = k_max / self.K_SCALE_CONSTANT
        if math.isfinite(v_max) and v_max > 0:
            self.v_scale = v_max / self.V_SCALE_CONSTANT
        self.calculate_kv_scales = False
        Attention.cache_bindings += 1          # what captured the old scales rebuilds

    def forward_ops(self, q, k, v, attn_metadata):
        return self._forward(ops, q, k, v, attn_metadata)

    def forward_native(self, q, k, v, attn_metadata):
        return self._forward(ops_native, q, k, v, attn_metadata)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, "
                f"soft_cap={self.logit_soft_cap}, alibi={self.alibi_slopes is not None}")


def _attention_without_cache(impl, q, k, v, md: AttentionMetadata, layer: Attention) -> torch.Tensor:
    # Each sequence's context must be exactly its query rows (a whole prompt, nothing cached):
    # attend within the step's own K/V through a temporary one-block-per-sequence cache.
    starts = md.query_start_loc.tolist()
    lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if lens != md.seq_lens.tolist():
        raise RuntimeError("Attention has no KV cache: only whole prompts can run before the "
                           "runner sets k_cache/v_cache")
    block = max(lens + [1])
    cache_shape = (len(lens), block, layer.num_kv_heads, layer.head_size)
    k_cache, v_cache = k.new_zeros(cache_shape), v.new_zeros(cache_shape)
    slots = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)  # padding: -1
    for s, (start, n) in enumerate(zip(starts, lens)):
        slots[start:start + n] = torch.arange(n, device=q.device) + s * block
    table = torch.arange(len(lens), dtype=torch.int32, device=q.device).view(-1, 1)
    impl.reshape_and_cache(k, v, k_cache, v_cache, slots)
    slopes = None if layer.alibi_slopes is None else layer.alibi_slopes.to(q.device)
    return impl.paged_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens, table,
                                layer.scale, layer.sliding_window, layer.logit_soft_cap, slopes)
