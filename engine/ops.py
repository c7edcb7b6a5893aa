"""Python entry points for the compiled kernels (torch.ops.octavo.*, built into octavo._C).

Each wrapper allocates its output and calls the registered op; signatures match octavo.ops_native.
Importing this module raises ImportError (saying why) if octavo._C is missing or fails to load;
there is no silent fallback. Set OCTAVO_USE_NATIVE_OPS=1 to use the references on purpose.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import NamedTuple

import torch

from octavo import ops_native, weight_memory


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


def can_pack_in_place(weight: torch.Tensor) -> bool:
    """Whether pack_linear_panels(weight, in_place=True) reuses weight's memory: a contiguous CPU
    weight that alone fills its storage, N a multiple of 64 and K even (no padding)."""
    n, k = weight.shape
    return (not USING_NATIVE and weight.device.type == "cpu" and weight.element_size() in (2, 4)
            and n % 64 == 0 and k % 2 == 0 and weight.is_contiguous() and weight.storage_offset() == 0
            and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size())


def pack_linear_panels(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    # weight [N, K] (bf16 / fp16 / fp32, CPU) -> [ceil(N/64), ceil(K/2), 64, 2]. in_place: where
    # can_pack_in_place(weight), the packed panels overwrite weight's own memory (no second copy
    # of the weight at load; weight must not be read as [N, K] afterwards)
    n, k = weight.shape
    if in_place and can_pack_in_place(weight):
        packed = weight.view(n // 64, k // 2, 64, 2)
        torch.ops.octavo.pack_linear_panels(packed, weight)
        return packed
    if weight.device.type != "cpu" or weight.element_size() not in (2, 4):
        return ops_native.pack_linear_panels(weight)
    if k > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    out = weight_memory.empty((-(-n // 64), (k + 1) // 2, 64, 2), weight.dtype)
    torch.ops.octavo.pack_linear_panels(out, weight)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2*D] -> [T, D]
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops.octavo.silu_and_mul(out, x)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    # x: [N, V] -> [N] int64, torch.argmax(x, dim=-1) (first maximum; first NaN if any). The CPU
    # kernel takes float32 rows with a unit last stride; anything else goes to torch.argmax.
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0
            or (x.shape[1] > 1 and x.stride(1) != 1)):
        return ops_native.argmax_rows(x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    torch.ops.octavo.argmax_rows(out, x)
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
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    # key/value: [T, Hk, hd] -> caches [num_blocks, block_size, Hk, hd] at slot_mapping (-1 skipped);
    # fp8 caches store key / k_scale and value / v_scale
    torch.ops.octavo.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, sliding_window: int = 0,
                    soft_cap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    # query: [T, Hq, hd] -> out [T, Hq, hd]; see INTERFACES.md for the masking rules; an fp8
    # cache's keys are its values times k_scale, its values times v_scale
    if out is None:
        out = torch.empty_like(query)
    torch.ops.octavo.paged_attention(out, query, key_cache, value_cache, query_start_loc,
                                     seq_lens, block_table, scale, sliding_window, soft_cap,
                                     alibi_slopes, k_scale, v_scale)
    return out



# ---- multi-head latent attention (signatures and semantics: ops_native) ----

def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    # kv_c [T, L], k_pe [T, R] -> kv_cache [num_blocks, block_size, L+R]: the latent cache seen
    # as a one-head K (and V) cache, written by reshape_and_cache
    latent = torch.cat([kv_c, k_pe], dim=-1).unsqueeze(1)             # [T, 1, L+R]
    cache = kv_cache.unsqueeze(2)                                     # [N, B, 1, L+R]
    torch.ops.octavo.reshape_and_cache(latent, latent, cache, cache, slot_mapping)


def mla_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                        kv_lora_rank: int) -> torch.Tensor:
    # q [T, H, L+R] -> [T, H, L]; CPU: the paged-attention kernel reading the latent cache as a
    # one-head K and V; CUDA: csrc/cuda/mla.cuh (one warp per head)
    ops_native.check_mla_args(q, kv_cache, kv_lora_rank)
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    torch.ops.octavo.mla_paged_attention(out, q, kv_cache, query_start_loc, seq_lens, block_table,
                                         scale, kv_lora_rank)
    return out


# ---- mixture of experts (signatures and semantics: ops_native) ----

def topk_routing(gating_output: torch.Tensor, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True, bias: torch.Tensor | None = None, n_group: int = 1,
                 topk_group: int = 1, group_score: str = "max",
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # gating_output: [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int32)
    ops_native.check_topk_routing_args(gating_output, top_k, scoring, bias, n_group, topk_group,
                                       group_score)
    t = gating_output.shape[0]
    if bias is not None:  # the kernels read an fp32 bias (checkpoints may store it in bf16)
        bias = bias.to(torch.float32).contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=gating_output.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=gating_output.device)
    torch.ops.octavo.topk_routing(weights, ids, gating_output, scoring, renormalize, bias, n_group,
                                  topk_group, group_score, routed_scaling_factor)
    return weights, ids


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # topk_ids: [T, k] int32 -> (sorted_token_ids [P], expert_ids [P // block_size], post_pad [1]);
    # P = ops_native.moe_align_sizes(T * k, num_experts, block_size) depends on shapes only
    ops_native.check_moe_align_args(topk_ids, num_experts, block_size)
    p, nblocks = ops_native.moe_align_sizes(topk_ids.numel(), num_experts, block_size)
    dev = topk_ids.device
    sorted_ids = torch.empty(p, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(nblocks, dtype=torch.int32, device=dev)
    post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    torch.ops.octavo.moe_align(sorted_ids, expert_ids, post_pad, topk_ids.contiguous(), num_experts,
                               block_size)
    return sorted_ids, expert_ids, post_pad


def _check_ids_on_cpu(topk_ids: torch.Tensor, num_experts: int) -> None:
    # On CPU the check costs nothing; on CUDA it would synchronize (and break graph capture).
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"fused_moe: expert ids must be in [0, {num_experts}), got {lo}..{hi}")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu") -> torch.Tensor:
    # hidden: [T, H], w13: [E, 2I, H], w2: [E, H, I] -> out [T, H]. On CPU this packs the weights
    # on every call: layers call prepare_moe_weights once and fused_moe_prepared.
    ops_native.check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, activation)
    if hidden.is_cuda and hidden.dtype == torch.float32:
        # the CUDA kernel runs on tensor cores (bf16 / fp16); fp32 GPU models take the reference
        return ops_native.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
    _check_ids_on_cpu(topk_ids, w13.shape[0])
    out = torch.empty_like(hidden)
    torch.ops.octavo.fused_moe(out, hidden, w13, w2, topk_weights.contiguous(),
                               topk_ids.contiguous(), activation)
    return out


class PackedMoEWeights(NamedTuple):
    """Expert weights in the CPU kernel's panel layout (ops_native.pack_moe_weights)."""
    w13: torch.Tensor  # [E, ceil(I/64), 2, ceil(H/2), 64, 2]
    w2: torch.Tensor   # [E, ceil(H/64), ceil(I/2), 64, 2]
    hidden_size: int
    inter_size: int


def prepare_moe_weights(w13: torch.Tensor, w2: torch.Tensor):
    """Repacks the expert weights once after loading (CPU: 64-output panels; CUDA: unchanged);
    pass the result to fused_moe_prepared."""
    if w13.device.type != "cpu":
        return (w13, w2)
    # ops_native.pack_moe_weights' layout, each panel view copied straight into the weights' own
    # (huge-page) memory: one pass, no intermediate packed copies
    h, i = w13.shape[2], w13.shape[1] // 2
    gate, up, down = (ops_native.moe_panels_view(w) for w in (w13[:, :i], w13[:, i:], w2))
    w13p = weight_memory.empty((gate.shape[0], gate.shape[1], 2, *gate.shape[2:]), w13.dtype)
    w13p[:, :, 0].copy_(gate)
    w13p[:, :, 1].copy_(up)
    w2p = weight_memory.empty(tuple(down.shape), w2.dtype).copy_(down)
    return PackedMoEWeights(w13p, w2p, h, i)


def fused_moe_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: prepare_moe_weights(w13, w2) -> out [T, H]
    if not isinstance(prepared, PackedMoEWeights):
        return fused_moe(hidden, *prepared, topk_weights, topk_ids, activation)
    e, h, i = prepared.w13.shape[0], prepared.hidden_size, prepared.inter_size
    meta_w13 = torch.empty(e, 2 * i, h, dtype=prepared.w13.dtype, device="meta")
    meta_w2 = torch.empty(e, h, i, dtype=prepared.w2.dtype, device="meta")
    ops_native.check_fused_moe_args(hidden, meta_w13, meta_w2, topk_weights, topk_ids, activation)
    _check_ids_on_cpu(topk_ids, e)
    out = torch.empty_like(hidden)
    torch.ops.octavo.fused_moe_packed(out, hidden, prepared.w13, prepared.w2,
                                      topk_weights.contiguous(), topk_ids.contiguous(), i, activation)
    return out


# ---- INT4 weight-only GEMM (semantics and layout: ops_native.int4_* / pack_int4_panels) ----

class Int4Weight(NamedTuple):
    """A 4-bit weight [n, k] repacked once for the CPU kernel (ops_native.int4_prepare)."""
    packed: torch.Tensor          # uint8 [ceil(n/32), ceil(k/2), 32]
    scales_offsets: torch.Tensor  # float32 [ceil(n/32), G, 2, 32]
    n: int
    k: int
    group_size: int               # of the packed (permuted) K order
    perm: torch.Tensor | None     # act-order: x[:, perm] is the packed K order


def pack_int4_panels(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # codes [N, K] -> (uint8 [ceil(N/32), ceil(K/2), 32], float32 [ceil(N/32), G, 2, 32]): the
    # layout and bytes of ops_native.pack_int4_panels, in one pass over the codes on the CPU
    if qweight.device.type != "cpu" or USING_NATIVE:
        return ops_native.pack_int4_panels(qweight, scales, offsets, group_size)
    n, k = qweight.shape
    _, groups = ops_native.int4_groups(k, group_size)
    q = qweight if qweight.dtype == torch.uint8 else qweight.to(torch.uint8)
    if k > 1 and q.stride(1) != 1:
        q = q.contiguous()
    s, o = scales.float().contiguous(), offsets.float().contiguous()
    if s.shape != (n, groups) or o.shape != (n, groups):
        raise ValueError(f"pack_int4_panels: scales and offsets must be [{n}, {groups}], got "
                         f"{tuple(s.shape)} and {tuple(o.shape)}")
    packed = weight_memory.empty((-(-n // 32), (k + 1) // 2, 32), torch.uint8)
    so = weight_memory.empty((-(-n // 32), groups, 2, 32), torch.float32)
    torch.ops.octavo.pack_int4_panels(packed, so, q, s, o)
    return packed, so


def gguf_q4_blocks(raw, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GGUF Q4_0 (2) / Q4_1 (3) blocks, a [rows, row bytes] uint8 array (numpy, e.g. a slice of
    the file's read-only mmap, or a tensor) -> (codes uint8 [rows, K], d, m float32 [rows, K/32])
    decoded in C++ as gguf_loader.q4_blocks_reference does; None without the extension."""
    if USING_NATIVE:
        return None
    if not isinstance(raw, torch.Tensor):
        import warnings

        import numpy as np
        with warnings.catch_warnings():     # read only: the op never writes to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw))
    rows, row_bytes = raw.shape
    blocks = row_bytes // (20 if ggml_type == 3 else 18)
    codes = torch.empty(rows, 32 * blocks, dtype=torch.uint8)
    d = torch.empty(rows, blocks, dtype=torch.float32)
    m = torch.empty(rows, blocks, dtype=torch.float32)
    torch.ops.octavo.gguf_q4_blocks(codes, d, m, raw.contiguous(), ggml_type)
    return codes, d, m


def int4_prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, g_idx: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None) -> "Int4Weight":
    """ops_native.int4_prepare with the codes packed by pack_int4_panels above."""
    return ops_native.int4_prepare(qweight, scales, zeros, group_size, g_idx, offsets,
                                   pack=pack_int4_panels)


def int4_cuda_supported(dtype: torch.dtype, k: int, group_size: int) -> bool:
    """Whether the CUDA INT4 kernel takes these operands: tensor cores (bf16 / fp16 activations),
    groups of whole 16-wide K steps (or one group over K)."""
    gs, _ = ops_native.int4_groups(k, group_size)
    return dtype in (torch.bfloat16, torch.float16) and (gs % 16 == 0 or gs >= k)


def int4_gemm_packed(x: torch.Tensor, packed: torch.Tensor, scales_offsets: torch.Tensor, n: int,
                     group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] (unit last stride) -> [M, n]
    if x.is_cuda and not int4_cuda_supported(x.dtype, x.shape[1], group_size):
        return ops_native.int4_gemm_packed(x, packed, scales_offsets, n, group_size, bias)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    torch.ops.octavo.int4_gemm(out, x, packed, scales_offsets, group_size, bias)
    return out


def int4_gemm_prepared(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: ops_native.int4_prepare(...)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2[:, w.perm] if w.perm is not None else x2.contiguous() if x2.stride(-1) != 1 else x2
    return int4_gemm_packed(x2, w.packed, w.scales_offsets, w.n, w.group_size, bias).view(*x.shape[:-1], w.n)


class MoEInt4Weights(NamedTuple):
    """4-bit experts packed once for the CPU kernel (ops_native.prepare_moe_int4_weights; layout
    in ops_native's INT4 MoE section): pack_int4_panels of every expert, gate and up rows each
    padded to whole 32-row panels."""
    w13: torch.Tensor                 # uint8 [E, 2 * ceil(I/32), ceil(H/2), 32]
    w13_scales_offsets: torch.Tensor  # float32 [E, 2 * ceil(I/32), G13, 2, 32]
    w2: torch.Tensor                  # uint8 [E, ceil(H/32), ceil(I/2), 32]
    w2_scales_offsets: torch.Tensor   # float32 [E, ceil(H/32), G2, 2, 32]
    hidden_size: int
    inter_size: int
    group_size: int                   # -1: one group per output channel
    # act order (GPTQ desc_act): packed column c of expert e's w13 reads hidden[:, w13_perm[e, c]]
    w13_perm: torch.Tensor | None = None    # int32 [E, H], on the experts' device
    # packed intermediate j of expert e is the caller's row j' = inter_perm[e, j] of gate / up and
    # column j' of down (read by ops_native.unpack_moe_int4_weights only: the kernels need nothing)
    inter_perm: torch.Tensor | None = None  # int64 [E, I]


def prepare_moe_int4_weights(w13_q: torch.Tensor, w13_scales: torch.Tensor,
                             w13_zeros: torch.Tensor | None, w2_q: torch.Tensor,
                             w2_scales: torch.Tensor, w2_zeros: torch.Tensor | None,
                             group_size: int, w13_offsets: torch.Tensor | None = None,
                             w2_offsets: torch.Tensor | None = None,
                             w13_g_idx: torch.Tensor | None = None,
                             w2_g_idx: torch.Tensor | None = None) -> MoEInt4Weights:
    """4-bit experts packed once after loading (one layout on every device, see ops_native's
    INT4 MoE section); g_idx may be GPTQ's act order. Pass the result to fused_moe_int4_prepared."""
    return ops_native.prepare_moe_int4_weights(w13_q, w13_scales, w13_zeros, w2_q, w2_scales,
                                               w2_zeros, group_size, w13_offsets, w2_offsets,
                                               w13_g_idx, w2_g_idx, pack=pack_int4_panels)


def _moe_int4_kernel_on(device: torch.device) -> bool:
    return device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "octavo::fused_moe_int4_packed", device.type.upper())


def fused_moe_int4_prepared(hidden: torch.Tensor, prepared: MoEInt4Weights,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            activation: str = "silu") -> torch.Tensor:
    # hidden [T, H] -> out [T, H]; prepared: prepare_moe_int4_weights(...)
    p = prepared
    e, h, i = p.w13.shape[0], p.hidden_size, p.inter_size
    meta13 = torch.empty(e, 2 * i, h, dtype=torch.uint8, device="meta")
    meta2 = torch.empty(e, h, i, dtype=torch.uint8, device="meta")
    ops_native.check_fused_moe_args(hidden, meta13, meta2, topk_weights, topk_ids, activation)
    if not _moe_int4_kernel_on(hidden.device):
        # no INT4 MoE kernel registered for this device: the reference, on the packed weights
        return ops_native.fused_moe_int4_prepared(hidden, p, topk_weights, topk_ids, activation)
    if hidden.is_cuda and not (int4_cuda_supported(hidden.dtype, h, p.group_size)
                               and int4_cuda_supported(hidden.dtype, i, p.group_size)):
        # the CUDA kernel (csrc/cuda/moe_int4.cu) takes what the CUDA INT4 GEMM takes
        return ops_native.fused_moe_int4_prepared(hidden, p, topk_weights, topk_ids, activation)
    _check_ids_on_cpu(topk_ids, e)
    out = torch.empty_like(hidden)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    act_order = () if p.w13_perm is None else (p.w13_perm,)   # w13_perm: an optional last argument
    torch.ops.octavo.fused_moe_int4_packed(out, x, p.w13, p.w2, p.w13_scales_offsets,
                                           p.w2_scales_offsets, topk_weights.contiguous(),
                                           topk_ids.contiguous(), i, p.group_size, activation,
                                           *act_order)
    return out



def _cuda_kernel(op: str) -> bool:
    # whether the extension was built with a CUDA kernel for `op` ("octavo::name")
    return not USING_NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def int8_woq_cuda_supported(dtype: torch.dtype, k: int, group_size: int) -> bool:
    """Whether the CUDA weight-only INT8 kernels (csrc/cuda/int8_woq_gemm.cu, moe_int8.cu) take
    these operands: fp32 / bf16 / fp16 activations, groups of whole 16-wide K steps (or one group
    over K), an extension built with CUDA."""
    gs, _ = ops_native.int4_groups(k, group_size)
    return (dtype in (torch.float32, torch.bfloat16, torch.float16) and (gs % 16 == 0 or gs >= k)
            and _cuda_kernel("octavo::int8_woq_gemm"))


def moe_int8_kernel_takes(device: torch.device, dtype: torch.dtype, hidden_size: int,
                          inter_size: int, group_size13: int, group_size2: int) -> bool:
    """Whether fused_moe_int8_prepared runs a kernel (not the reference) for these operands: the
    CPU kernel, or the CUDA one where the CUDA weight-only INT8 GEMM would take both stacks."""
    if device.type == "cpu":
        return not USING_NATIVE
    return (device.type == "cuda" and _cuda_kernel("octavo::fused_moe_int8_packed")
            and int8_woq_cuda_supported(dtype, hidden_size, group_size13)
            and int8_woq_cuda_supported(dtype, inter_size, group_size2))


class MoEInt8Weights(NamedTuple):
    """Weight-only int8 experts packed once (ops_native.prepare_moe_int8_weights; layout in
    ops_native's INT8 MoE section), one layout for the CPU and CUDA kernels: each expert in the
    dense weight-only int8 layout, gate and up rows each padded to whole 16-row panels."""
    w13: torch.Tensor                 # int8 [E, 2 * ceil(I/16), H, 16]
    w13_scales_offsets: torch.Tensor  # float32 [E, 2 * ceil(I/16), G13, 2, 16]
    w2: torch.Tensor                  # int8 [E, ceil(H/16), I, 16]
    w2_scales_offsets: torch.Tensor   # float32 [E, ceil(H/16), G2, 2, 16]
    hidden_size: int
    inter_size: int
    group_size13: int                 # over H (H itself: one group per output channel)
    group_size2: int                  # over I


def prepare_moe_int8_weights(w13_q: torch.Tensor, w13_scales: torch.Tensor,
                             w13_offsets: torch.Tensor | None, w2_q: torch.Tensor,
                             w2_scales: torch.Tensor, w2_offsets: torch.Tensor | None,
                             group_size13: int, group_size2: int | None = None) -> MoEInt8Weights:
    """Weight-only int8 experts (W = q * scale + offset per group) packed once after loading;
    pass the result to fused_moe_int8_prepared."""
    return ops_native.prepare_moe_int8_weights(w13_q, w13_scales, w13_offsets, w2_q, w2_scales,
                                               w2_offsets, group_size13, group_size2)


def fused_moe_int8_prepared(hidden: torch.Tensor, prepared: MoEInt8Weights,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            activation: str = "silu") -> torch.Tensor:
    # hidden [T, H] -> out [T, H]; prepared: prepare_moe_int8_weights(...)
    p = prepared
    e, h, i = p.w13.shape[0], p.hidden_size, p.inter_size
    meta13 = torch.empty(e, 2 * i, h, dtype=torch.int8, device="meta")
    meta2 = torch.empty(e, h, i, dtype=torch.int8, device="meta")
    ops_native.check_fused_moe_args(hidden, meta13, meta2, topk_weights, topk_ids, activation)
    if USING_NATIVE or not moe_int8_kernel_takes(hidden.device, hidden.dtype, h, i, p.group_size13,
                                                 p.group_size2):
        # no INT8 MoE kernel for these operands: the reference, on the packed weights
        return ops_native.fused_moe_int8_prepared(hidden, p, topk_weights, topk_ids, activation)
    _check_ids_on_cpu(topk_ids, e)
    out = torch.empty_like(hidden)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    torch.ops.octavo.fused_moe_int8_packed(out, x, p.w13, p.w2, p.w13_scales_offsets,
                                           p.w2_scales_offsets, topk_weights.contiguous(),
                                           topk_ids.contiguous(), i, p.group_size13,
                                           p.group_size2, activation)
    return out

# ---- state-space models, Mamba-1 (signatures and semantics: ops_native's SSM section) ----

def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels read the small per-channel parameters as contiguous fp32 (a no-op when they are)
    return None if t is None else t.to(torch.float32).contiguous()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_states: torch.Tensor, query_start_loc: torch.Tensor,
                  state_indices: torch.Tensor, has_initial_state: torch.Tensor | None = None,
                  activation: str | None = "silu") -> torch.Tensor:
    # x: [T, D] (unit last stride), weight: [D, W], conv_states: [S, D, W-1] (in place) -> [T, D]
    ops_native.check_causal_conv1d_args(x, weight, bias, conv_states, activation)
    ops_native._check_ssm_batch("causal_conv1d", conv_states.shape[0], query_start_loc,
                                state_indices, has_initial_state, state_indices.shape[0],
                                x.shape[0], values=False)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.octavo.causal_conv1d(out, x, _f32(weight), _f32(bias), conv_states, query_start_loc,
                                   state_indices, has_initial_state, activation is not None)
    return out


def causal_conv1d_update(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, state_indices: torch.Tensor,
                         activation: str | None = "silu") -> torch.Tensor:
    # x: [B, D] one token per sequence -> out [B, D]
    ops_native.check_causal_conv1d_args(x, weight, bias, conv_states, activation,
                                        "causal_conv1d_update")
    ops_native._check_ssm_batch("causal_conv1d_update", conv_states.shape[0], None, state_indices,
                                None, x.shape[0], values=False)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.octavo.causal_conv1d_update(out, x, conv_states, _f32(weight), _f32(bias),
                                          state_indices, activation is not None)
    return out


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D_skip: torch.Tensor | None, z: torch.Tensor | None,
                   delta_bias: torch.Tensor | None, delta_softplus: bool,
                   ssm_states: torch.Tensor, query_start_loc: torch.Tensor,
                   state_indices: torch.Tensor,
                   has_initial_state: torch.Tensor | None = None) -> torch.Tensor:
    # u, delta, z: [T, D]; A: [D, N]; B, C: [T, N] (unit last strides); ssm_states: [S, D, N]
    # (in place) -> [T, D]
    ops_native.check_selective_scan_args(u, delta, A, B, C, D_skip, z, delta_bias, ssm_states)
    ops_native._check_ssm_batch("selective_scan", ssm_states.shape[0], query_start_loc,
                                state_indices, has_initial_state, state_indices.shape[0],
                                u.shape[0], values=False)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    torch.ops.octavo.selective_scan(out, u, delta, _f32(A), B, C, _f32(D_skip), z,
                                    _f32(delta_bias), delta_softplus, ssm_states, query_start_loc,
                                    state_indices, has_initial_state)
    return out


def selective_state_update(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                           A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D_skip: torch.Tensor | None, z: torch.Tensor | None,
                           dt_bias: torch.Tensor | None, dt_softplus: bool,
                           state_indices: torch.Tensor) -> torch.Tensor:
    # x, dt, z: [B, D]; B, C: [B, N]; ssm_states: [S, D, N] (in place) -> out [B, D]
    ops_native.check_selective_scan_args(x, dt, A, B, C, D_skip, z, dt_bias, ssm_states,
                                         "selective_state_update")
    ops_native._check_ssm_batch("selective_state_update", ssm_states.shape[0], None,
                                state_indices, None, x.shape[0], values=False)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.octavo.selective_state_update(out, ssm_states, x, dt, _f32(A), B, C, _f32(D_skip),
                                            z, _f32(dt_bias), dt_softplus, state_indices)
    return out


# ---- Mamba-2 SSD (signatures and semantics: ops_native, section "Mamba-2 SSD") ----

def _ssd_int32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.int32 else t.to(torch.int32)


def _ssd_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels read A, D and dt_bias as contiguous fp32 (no copy when they already are)
    return None if t is None else t.to(torch.float32).contiguous()


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, chunk_size: int, D_skip: torch.Tensor | None = None,
                   dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                   dt_limit=(0.0, float("inf")), ssm_states: torch.Tensor | None = None,
                   query_start_loc: torch.Tensor | None = None,
                   state_indices: torch.Tensor | None = None,
                   has_initial_state: torch.Tensor | None = None) -> torch.Tensor:
    # x [T, H, P], dt [T, H], B/C [T, G, N], ssm_states [S, H, P, N] (in place) -> [T, H, P]
    ops_native.check_ssd_args("ssd_chunk_scan", x, dt, A, B, C, D_skip, dt_bias, ssm_states,
                              state_indices, dt_limit)
    if query_start_loc is None:
        raise ValueError("ssd_chunk_scan: query_start_loc is required")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    A, D_skip, dt_bias = _ssd_f32(A), _ssd_f32(D_skip), _ssd_f32(dt_bias)
    torch.ops.octavo.ssd_chunk_scan(out, x, dt, A, B, C, chunk_size, D_skip, dt_bias, dt_softplus,
                                    float(dt_limit[0]), float(dt_limit[1]), ssm_states,
                                    _ssd_int32(query_start_loc), _ssd_int32(state_indices),
                                    has_initial_state)
    return out


def ssd_state_update(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D_skip: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                     dt_softplus: bool = False, dt_limit=(0.0, float("inf")),
                     state_indices: torch.Tensor | None = None) -> torch.Tensor:
    # one token per sequence: x [B, H, P], dt [B, H], B/C [B, G, N] -> out [B, H, P]
    ops_native.check_ssd_args("ssd_state_update", x, dt, A, B, C, D_skip, dt_bias, ssm_states,
                              state_indices, dt_limit)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    A, D_skip, dt_bias = _ssd_f32(A), _ssd_f32(D_skip), _ssd_f32(dt_bias)
    torch.ops.octavo.ssd_state_update(out, ssm_states, x, dt, A, B, C, D_skip, dt_bias,
                                      dt_softplus, float(dt_limit[0]), float(dt_limit[1]),
                                      _ssd_int32(state_indices))
    return out


# ---- gated delta rule (Kimi-Linear KDA / GDN; semantics: ops_native, "Gated delta rule") ----

def _gdr(q, k, v, g, beta, ssm_states, query_start_loc, state_indices, has_initial_state, scale,
         use_qk_l2norm) -> torch.Tensor:
    # CPU kernel (csrc/cpu/gated_delta_rule.cpp), CUDA kernel (csrc/cuda/gated_delta_rule.cu);
    # the CUDA kernel keeps K x 32 state columns in shared memory: larger key dims take the
    # reference
    if q.is_cuda and q.shape[-1] > 256:
        if query_start_loc is None:
            return ops_native.gated_delta_rule_update(ssm_states, q, k, v, g, beta, state_indices,
                                                      scale, use_qk_l2norm)
        return ops_native.gated_delta_rule(q, k, v, g, beta, ssm_states, query_start_loc,
                                           state_indices, has_initial_state, scale, use_qk_l2norm)
    if g.dim() == 2:  # one gate per head: a stride-0 key dim
        g = g.unsqueeze(-1).expand(*q.shape)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    torch.ops.octavo.gated_delta_rule(out, q, k, v, g.to(torch.float32),
                                      beta.to(torch.float32), ssm_states,
                                      _ssd_int32(query_start_loc), _ssd_int32(state_indices),
                                      has_initial_state,
                                      q.shape[-1] ** -0.5 if scale is None else float(scale),
                                      use_qk_l2norm)
    return out


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, ssm_states: torch.Tensor | None = None,
                     query_start_loc: torch.Tensor | None = None,
                     state_indices: torch.Tensor | None = None,
                     has_initial_state: torch.Tensor | None = None, scale: float | None = None,
                     use_qk_l2norm: bool = True) -> torch.Tensor:
    # q/k [T, H, K], v [T, H, V], g [T, H, K] or [T, H], beta [T, H], ssm_states [S, H, K, V]
    ops_native.check_gdr_args("gated_delta_rule", q, k, v, g, beta, ssm_states, state_indices)
    if query_start_loc is None:
        raise ValueError("gated_delta_rule: query_start_loc is required")
    return _gdr(q, k, v, g, beta, ssm_states, query_start_loc, state_indices, has_initial_state,
                scale, use_qk_l2norm)


def gated_delta_rule_update(ssm_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            state_indices: torch.Tensor | None = None,
                            scale: float | None = None, use_qk_l2norm: bool = True) -> torch.Tensor:
    # one token per sequence: q/k [B, H, K], v [B, H, V] -> out [B, H, V]
    ops_native.check_gdr_args("gated_delta_rule_update", q, k, v, g, beta, ssm_states,
                              state_indices)
    return _gdr(q, k, v, g, beta, ssm_states, None, state_indices, None, scale, use_qk_l2norm)


if USING_NATIVE:
    from octavo.ops_native import argmax_rows  # noqa: F811
    from octavo.ops_native import (fused_add_rms_norm, gelu_and_mul, linear, linear_packed,  # noqa: F811
                                   pack_linear_panels, paged_attention, reshape_and_cache, rms_norm,
                                   rotary_embedding, silu_and_mul)
    from octavo.ops_native import (fused_moe, fused_moe_prepared, moe_align,  # noqa: F811
                                   prepare_moe_weights, topk_routing)
    from octavo.ops_native import concat_and_cache_mla, mla_paged_attention  # noqa: F811
    from octavo.ops_native import int4_gemm_packed, int4_gemm_prepared  # noqa: F811
    from octavo.ops_native import fused_moe_int4_prepared  # noqa: F811
    from octavo.ops_native import ssd_chunk_scan, ssd_state_update  # noqa: F811
    from octavo.ops_native import gated_delta_rule, gated_delta_rule_update  # noqa: F811
    from octavo.ops_native import (causal_conv1d, causal_conv1d_update,  # noqa: F811
                                   selective_scan, selective_state_update)


# ---- FP8 (E4M3) weight GEMM (semantics and scale layouts: ops_native's FP8 section) ----

def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             block_size: tuple[int, int] | list[int] | None = None,
             bias: torch.Tensor | None = None, act_scale=None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; weight: e4m3 [N, K]; weight_scale: per-tensor, [N] / [N, 1]
    # per-channel, or [N/bn, K/bk] with block_size (bn, bk); act_scale: None (W8A16),
    # "dynamic" (per-token e4m3 activations) or a static input scale
    if x.is_cuda and x.dtype == torch.float32:
        # the CUDA kernel runs on tensor cores (bf16 / fp16); fp32 GPU models take the reference
        return ops_native.fp8_gemm(x, weight, weight_scale, block_size, bias, act_scale)
    n, k = weight.shape
    scale, bn, bk = ops_native.fp8_scale_blocks(weight_scale, n, k, block_size)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, xs = ops_native.fp8_activations(x2, act_scale)
    if xs is not None:
        xq = xq.view(torch.uint8)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    torch.ops.octavo.fp8_gemm(out, xq, ops_native.fp8_codes(weight), scale, bn, bk, xs, bias)
    return out.view(*x.shape[:-1], n)


if USING_NATIVE:
    from octavo.ops_native import fp8_gemm  # noqa: F811


class PackedMoEFp8Weights(NamedTuple):
    """e4m3 experts in the CPU kernel's panel layout (pack_moe_weights of their bytes) with fp32
    scales per output row and K-block (ops_native.pack_moe_fp8_scales)."""
    w13: torch.Tensor        # uint8 [E, ceil(I/64), 2, ceil(H/2), 64, 2]
    w2: torch.Tensor         # uint8 [E, ceil(H/64), ceil(I/2), 64, 2]
    w13_scale: torch.Tensor  # float32 [E, ceil(I/64), 2, ceil(H/block_k13), 64]
    w2_scale: torch.Tensor   # float32 [E, ceil(H/64), ceil(I/block_k2), 64]
    hidden_size: int
    inter_size: int
    block_k13: int
    block_k2: int


class MoEFp8Weights(NamedTuple):
    """e4m3 experts as loaded with fp32 scales per output row and K-block (CUDA's form)."""
    w13: torch.Tensor        # e4m3 [E, 2I, H]
    w2: torch.Tensor         # e4m3 [E, H, I]
    w13_scale: torch.Tensor  # float32 [E, 2I, ceil(H/block_k13)]
    w2_scale: torch.Tensor   # float32 [E, H, ceil(I/block_k2)]
    block_k13: int
    block_k2: int


def prepare_moe_fp8_weights(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                            w2_scale: torch.Tensor, block_size=None):
    """e4m3 experts (w13 [E, 2I, H], w2 [E, H, I]) and their scales (ops_native.fused_moe_fp8)
    prepared once after loading (CPU: packed panels; CUDA: scales per row); pass the result to
    fused_moe_fp8_prepared."""
    if w13.device.type not in ("cpu", "cuda"):
        return ops_native.prepare_moe_fp8_weights(w13, w2, w13_scale, w2_scale, block_size)
    h, i = w13.shape[2], w13.shape[1] // 2
    s13, bk13 = ops_native.fp8_moe_row_scales(w13_scale, 2 * i, h, block_size)
    s2, bk2 = ops_native.fp8_moe_row_scales(w2_scale, h, i, block_size)
    if w13.device.type == "cuda":
        return MoEFp8Weights(w13, w2, s13, s2, bk13, bk2)
    for bk, k in ((bk13, h), (bk2, i)):
        if bk % 2 and bk < k:   # the kernel reads K in pairs
            raise ValueError(f"fused_moe_fp8: scale blocks along K must hold an even number of "
                             f"columns (or all {k} of them), got {bk}")
    w13p, w2p = ops_native.pack_moe_weights(ops_native.fp8_codes(w13), ops_native.fp8_codes(w2))
    s13p, s2p = ops_native.pack_moe_fp8_scales(s13, s2)
    return PackedMoEFp8Weights(w13p, w2p, s13p, s2p, h, i, bk13, bk2)


def unpack_moe_fp8_weights(prepared):
    """What prepare_moe_fp8_weights was given, in a form the reference takes: (w13, w2,
    w13_scale, w2_scale, block_size)."""
    if isinstance(prepared, MoEFp8Weights):
        p = prepared
        block = None
        if p.w13_scale.shape[2] > 1 or p.w2_scale.shape[2] > 1:
            block = (1, p.block_k13 if p.w13_scale.shape[2] > 1 else p.block_k2)
        return (p.w13, p.w2, p.w13_scale, p.w2_scale, block)
    if not isinstance(prepared, PackedMoEFp8Weights):
        return tuple(prepared)
    p = prepared
    w13, w2 = ops_native.unpack_moe_weights(p.w13, p.w2, p.hidden_size, p.inter_size)
    s13, s2 = ops_native.unpack_moe_fp8_scales(p.w13_scale, p.w2_scale, p.hidden_size,
                                               p.inter_size)
    block = None
    if s13.shape[2] > 1 or s2.shape[2] > 1:     # one block width for both (block_size's)
        block = (1, p.block_k13 if s13.shape[2] > 1 else p.block_k2)
    return (w13.view(torch.float8_e4m3fn), w2.view(torch.float8_e4m3fn), s13, s2, block)


def fused_moe_fp8_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: prepare_moe_fp8_weights(...) -> out [T, H]
    if isinstance(prepared, MoEFp8Weights) and hidden.dtype != torch.float32:
        p = prepared
        ops_native.check_fused_moe_args(hidden, p.w13, p.w2, topk_weights, topk_ids, activation)
        out = torch.empty_like(hidden)
        torch.ops.octavo.fused_moe_fp8(out, hidden, ops_native.fp8_codes(p.w13),
                                       ops_native.fp8_codes(p.w2), p.w13_scale, p.w2_scale,
                                       topk_weights.contiguous(), topk_ids.contiguous(),
                                       p.block_k13, p.block_k2, activation)
        return out
    if isinstance(prepared, MoEFp8Weights):
        # the CUDA kernel runs on tensor cores (bf16 / fp16); fp32 GPU models take the reference
        return ops_native.fused_moe_fp8_prepared(hidden, unpack_moe_fp8_weights(prepared),
                                                 topk_weights, topk_ids, activation)
    if not isinstance(prepared, PackedMoEFp8Weights):
        return ops_native.fused_moe_fp8_prepared(hidden, prepared, topk_weights, topk_ids,
                                                 activation)
    e, h, i = prepared.w13.shape[0], prepared.hidden_size, prepared.inter_size
    meta_w13 = torch.empty(e, 2 * i, h, dtype=torch.uint8, device="meta")
    meta_w2 = torch.empty(e, h, i, dtype=torch.uint8, device="meta")
    ops_native.check_fused_moe_args(hidden, meta_w13, meta_w2, topk_weights, topk_ids, activation)
    _check_ids_on_cpu(topk_ids, e)
    out = torch.empty_like(hidden)
    torch.ops.octavo.fused_moe_fp8_packed(out, hidden, prepared.w13, prepared.w2,
                                          prepared.w13_scale, prepared.w2_scale,
                                          topk_weights.contiguous(), topk_ids.contiguous(), i,
                                          prepared.block_k13, prepared.block_k2, activation)
    return out


def fused_moe_fp8(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu", block_size=None) -> torch.Tensor:
    # hidden [T, H]; e4m3 w13 [E, 2I, H], w2 [E, H, I]; scales per expert (ops_native.fused_moe_fp8)
    prepared = prepare_moe_fp8_weights(w13, w2, w13_scale, w2_scale, block_size)
    return fused_moe_fp8_prepared(hidden, prepared, topk_weights, topk_ids, activation)


if USING_NATIVE:
    from octavo.ops_native import (fused_moe_fp8, fused_moe_fp8_prepared,  # noqa: F811
                                   prepare_moe_fp8_weights)
# ---- end FP8 ----


# ---- LoRA shrink / expand (semantics: ops_native's LoRA section) ----

def lora_shrink(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    # x: [T, K], w: [L, R, K], indices: [T] int64 (-1: no adapter) -> [T, R] float32
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    torch.ops.octavo.lora_shrink(out, x, w, indices, scale)
    return out


def lora_expand(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor,
                offset: int = 0) -> None:
    # in place: out[t, offset:offset + N] += w[indices[t]] @ x[t]; x: [T, R] float32,
    # w: [L, N, R], out: [T, N_total]
    torch.ops.octavo.lora_expand(out, x, w, indices, offset)


if USING_NATIVE:
    from octavo.ops_native import lora_expand, lora_shrink  # noqa: F811
# ---- end LoRA ----


# ---- INT8 GEMM (semantics and layouts: ops_native's INT8 section) ----

class Int8Weight(NamedTuple):
    """A W8A8 weight [n, k] repacked once for the CPU kernel (ops_native.int8_prepare)."""
    packed: torch.Tensor   # int8 [ceil(n/16), ceil(k/2), 16, 2]
    scales: torch.Tensor   # float32 [n] per-channel weight scales
    colsum: torch.Tensor   # int32 [n] sum over K of the codes (asymmetric activations)
    n: int
    k: int


class Int8WoqWeight(NamedTuple):
    """A weight-only int8 weight [n, k] repacked once (ops_native.int8_woq_prepare)."""
    packed: torch.Tensor          # int8 [ceil(n/16), k, 16]
    scales_offsets: torch.Tensor  # float32 [ceil(n/16), G, 2, 16]
    n: int
    k: int
    group_size: int


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2.contiguous() if x2.stride(-1) != 1 else x2


def _bias(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias


def int8_gemm_prepared(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None,
                       asymmetric: bool = False, input_scale: torch.Tensor | None = None,
                       input_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: ops_native.int8_prepare(...)
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w.n, dtype=x.dtype, device=x.device)
    torch.ops.octavo.int8_gemm(out, x2, w.packed, w.scales, w.colsum, input_scale,
                               input_zero_point, asymmetric, _bias(bias, x))
    return out.view(*x.shape[:-1], w.n)


def int8_woq_gemm_prepared(x: torch.Tensor, w: Int8WoqWeight,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: ops_native.int8_woq_prepare(...)
    if x.is_cuda and not int8_woq_cuda_supported(x.dtype, w.k, w.group_size):
        return ops_native.int8_woq_gemm_prepared(x, w, bias)
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w.n, dtype=x.dtype, device=x.device)
    torch.ops.octavo.int8_woq_gemm(out, x2, w.packed, w.scales_offsets, w.group_size,
                                   _bias(bias, x))
    return out.view(*x.shape[:-1], w.n)


if USING_NATIVE:
    from octavo.ops_native import int8_gemm_prepared, int8_woq_gemm_prepared  # noqa: F811
# ---- end INT8 GEMM ----


# ---- speculative decoding's rejection sampler (semantics: octavo.spec_decode.rejection) ----

from octavo.spec_decode.rejection import check_rejection_args  # noqa: E402


def _f32_rows(t: torch.Tensor) -> torch.Tensor:
    # the reference computes in float32 (.float(); p / noise promotes half noise to float32)
    t = t.float()
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                     draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     uniform: torch.Tensor, exp_noise: torch.Tensor,
                     greedy: torch.Tensor) -> torch.Tensor:
    # draft_token_ids [B, K], num_draft_tokens [B], draft_probs [B, K, V] or None (point-mass
    # drafts), target_probs [B, K+1, V], uniform [B, K], exp_noise [B, K+1, V], greedy [B] bool
    # -> [B, K+1] int64: accepted drafts, one recovered or bonus token, then -1
    check_rejection_args(draft_token_ids, num_draft_tokens, draft_probs, target_probs, uniform,
                         exp_noise, greedy)
    if exp_noise.dtype == torch.float64:  # p / noise would be a float64 division there
        raise ValueError("rejection_sample: exp_noise must be float32 (or bfloat16 / float16), "
                         "got float64")
    B, K = draft_token_ids.shape
    out = torch.empty(B, K + 1, dtype=torch.int64, device=target_probs.device)
    # u * q(d) < p(d) is compared in double (as the reference's Python floats)
    torch.ops.octavo.rejection_sample(
        out, draft_token_ids.to(torch.int64).contiguous(),
        num_draft_tokens.to(torch.int64).contiguous(),
        None if draft_probs is None else _f32_rows(draft_probs),
        _f32_rows(target_probs), uniform.to(torch.float64).contiguous(),
        _f32_rows(exp_noise), greedy.to(torch.bool).contiguous())
    return out


if USING_NATIVE:
    from octavo.ops_native import rejection_sample  # noqa: F811
# ---- end rejection sampler ----
