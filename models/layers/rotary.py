"""Rotary position embeddings: one cos/sin cache per (head size, base, scaling) shared by layers.

Cache layout (INTERFACES.md): `cos_sin_cache` [max_pos, rotary_dim] float32, cos in the first
half, sin in the second. Scaled variants only change inv_freq, the cache length and a cos/sin
multiplier (YaRN's attention factor); the kernel is the same. Scaling formulas follow
transformers' ROPE_INIT_FUNCTIONS; dynamic NTK uses a fixed base for the longest context (as
vLLM does), not transformers' per-forward recomputation.
"""
from __future__ import annotations

import math

import torch

from octavo import ops, ops_native
from octavo.models.layers.custom_op import CustomOp


class RotaryEmbedding(CustomOp):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True):
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
        self.head_size, self.rotary_dim = head_size, rotary_dim
        self.max_position, self.base, self.is_neox_style = max_position, float(base), is_neox_style
        # A plain attribute, not a buffer: model.to(dtype) must not round it; moved lazily.
        self.cos_sin_cache = self._compute_cos_sin_cache()  # [max_pos, rotary_dim] fp32

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (base ** exponents)

    def _cache_length(self) -> int:
        return self.max_position

    def _mscale(self) -> float:
        return 1.0

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq = self._compute_inv_freq(self.base).to(torch.float32)
        t = torch.arange(self._cache_length(), dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)  # [max_pos, rotary_dim // 2]
        return torch.cat((freqs.cos() * self._mscale(), freqs.sin() * self._mscale()), dim=-1)

    def _cache_on(self, device: torch.device) -> torch.Tensor:
        if self.cos_sin_cache.device != device:
            self.cos_sin_cache = self.cos_sin_cache.to(device)
        return self.cos_sin_cache

    def _forward(self, impl, positions, query, key):
        # positions [T] int64; query [T, Hq*hd]; key [T, Hk*hd] or None; rotated in place.
        impl.rotary_embedding(positions, query, key, self.head_size,
                              self._cache_on(query.device), self.is_neox_style)
        return query, key

    def forward_ops(self, positions, query, key=None):
        return self._forward(ops, positions, query, key)

    def forward_native(self, positions, query, key=None):
        return self._forward(ops_native, positions, query, key)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.max_position}, base={self.base}, neox={self.is_neox_style}")


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """Position interpolation: inv_freq / factor over factor x the context."""

    def __init__(self, head_size, rotary_dim, max_position, base, is_neox_style, factor: float):
        self.factor = float(factor)
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _compute_inv_freq(self, base):
        return super()._compute_inv_freq(base) / self.factor

    def _cache_length(self):
        return int(self.max_position * self.factor)


class DynamicNTKScalingRotaryEmbedding(RotaryEmbedding):
    """NTK-aware base stretched once for the longest context, factor x max_position."""

    def __init__(self, head_size, rotary_dim, max_position, base, is_neox_style, factor: float):
        self.factor = float(factor)
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _compute_inv_freq(self, base):
        d = self.rotary_dim
        base = base * (self.factor * self._cache_length() / self.max_position
                       - (self.factor - 1)) ** (d / (d - 2))
        return super()._compute_inv_freq(base)

    def _cache_length(self):
        return int(self.max_position * self.factor)


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1: low frequencies divided by factor, high kept, a smooth ramp between."""

    def __init__(self, head_size, rotary_dim, max_position, base, is_neox_style, factor: float,
                 low_freq_factor: float, high_freq_factor: float, original_max_position: int):
        self.factor, self.low_freq_factor = float(factor), float(low_freq_factor)
        self.high_freq_factor, self.original_max_position = float(high_freq_factor), original_max_position
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _compute_inv_freq(self, base):
        inv_freq = super()._compute_inv_freq(base)
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = ((self.original_max_position / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class YaRNScalingRotaryEmbedding(RotaryEmbedding):
    """YaRN: per-dimension blend of interpolated and extrapolated frequencies, cos/sin scaled
    by the attention factor. max_position is the original (pretraining) context."""

    def __init__(self, head_size, rotary_dim, max_position, base, is_neox_style, factor: float,
                 beta_fast: float = 32, beta_slow: float = 1, attention_factor: float | None = None,
                 mscale: float | None = None, mscale_all_dim: float | None = None,
                 truncate: bool = True):
        self.factor, self.beta_fast, self.beta_slow = float(factor), beta_fast, beta_slow
        self.truncate = truncate
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        self.attention_factor = float(attention_factor)
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _correction_dim(self, rotations: float, base: float) -> float:
        d = self.rotary_dim
        return d * math.log(self.max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    def _compute_inv_freq(self, base):
        d = self.rotary_dim
        pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
        low = self._correction_dim(self.beta_fast, base)
        high = self._correction_dim(self.beta_slow, base)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight

    def _cache_length(self):
        return int(self.max_position * self.factor)

    def _mscale(self):
        return self.attention_factor


def rope_parameters(hf_config, layer_type: str = "full_attention") -> tuple[float, dict | None]:
    """(base, scaling dict or None) from a config in transformers 5 form (`rope_parameters` with
    rope_type/rope_theta) or the older `rope_theta` + `rope_scaling` (with "type"/"rope_type").
    Per-layer-type configs (Gemma3: a local base for sliding layers) give `layer_type`'s entry."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and "full_attention" in params:
        params = params.get(layer_type) or params["full_attention"]
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params = dict(params)
    base = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        extra = {k: v for k, v in params.items() if k == "partial_rotary_factor"}
        return float(base), ({"rope_type": "default", **extra} if extra else None)
    return float(base), {"rope_type": rope_type, **params}


_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float,
             is_neox_style: bool = True, rope_scaling: dict | None = None,
             dtype: torch.dtype | None = None) -> RotaryEmbedding:
    """The (shared) rotary module for these settings. `rope_scaling` is a transformers
    rope_parameters / rope_scaling dict (rope_type or type: default, linear, dynamic, llama3,
    yarn). The cache is always float32, whatever `dtype` the model runs in."""
    key = (head_size, rotary_dim, max_position, float(base), is_neox_style, _freeze(rope_scaling))
    if key not in _ROPE_CACHE:
        _ROPE_CACHE[key] = _build_rope(head_size, rotary_dim, max_position, base, is_neox_style,
                                       dict(rope_scaling or {}))
    return _ROPE_CACHE[key]


def _build_rope(head_size, rotary_dim, max_position, base, neox, scaling: dict) -> RotaryEmbedding:
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    args = (head_size, rotary_dim, max_position, base, neox)
    if rope_type == "default":
        return RotaryEmbedding(*args)
    factor = scaling.get("factor")
    if rope_type == "linear":
        return LinearScalingRotaryEmbedding(*args, factor)
    if rope_type == "dynamic":
        return DynamicNTKScalingRotaryEmbedding(*args, factor)
    if rope_type == "llama3":
        return Llama3RotaryEmbedding(*args, factor, scaling["low_freq_factor"],
                                     scaling["high_freq_factor"],
                                     scaling["original_max_position_embeddings"])
    if rope_type == "yarn":
        original = scaling.get("original_max_position_embeddings") or max_position
        if factor is None:
            factor = max_position / original
        return YaRNScalingRotaryEmbedding(
            head_size, rotary_dim, original, base, neox, factor,
            beta_fast=scaling.get("beta_fast") or 32, beta_slow=scaling.get("beta_slow") or 1,
            attention_factor=scaling.get("attention_factor"), mscale=scaling.get("mscale"),
            mscale_all_dim=scaling.get("mscale_all_dim"), truncate=scaling.get("truncate", True))
    if rope_type in ("longrope", "su"):
        from octavo.models.layers.longrope import LongRoPEScaledRotaryEmbedding
        return LongRoPEScaledRotaryEmbedding(
            *args, scaling["original_max_position_embeddings"], scaling["short_factor"],
            scaling["long_factor"], factor, scaling.get("attention_factor"))
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, dynamic, "
                     "llama3, yarn, longrope")
