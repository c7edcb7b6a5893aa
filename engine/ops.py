"""Python entry points for the compiled kernels (torch.ops.octavo.*, built into octavo._C).

Each wrapper allocates its output and calls the registered op; signatures match octavo.ops_native.
Importing this module raises ImportError (saying why) if octavo._C is missing or fails to load;
there is no silent fallback. Set OCTAVO_USE_NATIVE_OPS=1 to use the references on purpose.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from octavo import ops_native


def _load_extension() -> bool:
    if os.environ.get("OCTAVO_USE_NATIVE_OPS", "0") == "1":
        return False
    if importlib.util.find_spec("octavo._C") is None:
        raise ImportError("octavo._C (the compiled kernels) is not built. Build it with "
                          "`pip install -e . --no-build-isolation` (or `pip install .`), or set "
                          "OCTAVO_USE_NATIVE_OPS=1 to run the slow PyTorch references.")
    try:
        importlib.import_module("octavo._C")
    except ImportError as e:
        raise ImportError(f"octavo._C exists but failed to load ({e}); rebuild with "
                          "`pip install -e . --no-build-isolation` against torch "
                          f"{torch.__version__}") from e
    return True


USING_NATIVE = not _load_extension()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H], weight: [H] -> [T, H]
    out = torch.empty_like(x)
    torch.ops.octavo.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    # in place: residual <- x + residual ; x <- rms_norm(residual) * weight
    torch.ops.octavo.fused_add_rms_norm(x, residual, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] (unit last stride), weight: [N, K] contiguous, bias: [N] -> out [M, N]; CPU only
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.octavo.linear(out, x, weight, bias)
    return out


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] bf16, packed: ops_native.pack_linear_panels(weight [n, K]), bias: [n] -> out [M, n]
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    torch.ops.octavo.linear_packed(out, x, packed, bias)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2*D] -> [T, D]
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops.octavo.silu_and_mul(out, x)
    return out


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    # x: [T, 2*D] -> [T, D]; approximate: "none" | "tanh"
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops.octavo.gelu_and_mul(out, x, approximate)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    # in place on query [T, Hq*hd] and key [T, Hk*hd] (views with unit last stride are fine)
    torch.ops.octavo.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # key/value: [T, Hk, hd] -> caches [num_blocks, block_size, Hk, hd] at slot_mapping (-1 skipped)
    torch.ops.octavo.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, sliding_window: int = 0,
                    soft_cap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    # query: [T, Hq, hd] -> out [T, Hq, hd]; see INTERFACES.md for the masking rules
    if out is None:
        out = torch.empty_like(query)
    torch.ops.octavo.paged_attention(out, query, key_cache, value_cache, query_start_loc,
                                     seq_lens, block_table, scale, sliding_window, soft_cap,
                                     alibi_slopes)
    return out



# ---- mixture of experts (signatures and semantics: ops_native) ----

def topk_routing(gating_output: torch.Tensor, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True, bias: torch.Tensor | None = None, n_group: int = 1,
                 topk_group: int = 1, group_score: str = "max",
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # gating_output: [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int32)
    return ops_native.topk_routing(gating_output, top_k, scoring, renormalize, bias, n_group,
                                   topk_group, group_score, routed_scaling_factor)


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # topk_ids: [T, k] int32 -> (sorted_token_ids [P], expert_ids [P // block_size], post_pad [1])
    return ops_native.moe_align(topk_ids, num_experts, block_size)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu") -> torch.Tensor:
    # hidden: [T, H], w13: [E, 2I, H], w2: [E, H, I] -> out [T, H]
    return ops_native.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)


def prepare_moe_weights(w13: torch.Tensor, w2: torch.Tensor):
    """Repacks the expert weights once after loading; pass the result to fused_moe_prepared."""
    return ops_native.prepare_moe_weights(w13, w2)


def fused_moe_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: prepare_moe_weights(w13, w2) -> out [T, H]
    return ops_native.fused_moe_prepared(hidden, prepared, topk_weights, topk_ids, activation)


if USING_NATIVE:
    from octavo.ops_native import (fused_add_rms_norm, gelu_and_mul, linear, linear_packed,  # noqa: F811
                                   paged_attention, reshape_and_cache, rms_norm,
                                   rotary_embedding, silu_and_mul)
