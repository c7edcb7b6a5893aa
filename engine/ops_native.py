"""Plain-PyTorch references for every kernel op (same Python signatures as octavo.ops).

These define the semantics the C++/CUDA kernels are tested against (tests/kernels). They compute
in fp32 (fp64 for fp64 inputs, which the tests use as the exact reference) and store in the
inputs' dtype, like the kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    # The accumulation type: fp64 stays fp64, everything else computes in fp32.
    return x.double() if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H], weight: [H] -> [T, H]
    xf = _acc(x)
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * _acc(weight)).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    # In place: residual <- x + residual (rounded to the dtype); x <- rms_norm(residual) * weight.
    residual.copy_((_acc(x) + _acc(residual)).to(residual.dtype))
    x.copy_(rms_norm(residual, weight, eps))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K], weight: [N, K], bias: [N] -> [M, N]
    y = F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias)).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


PANEL = 64  # outputs per panel of the packed linear layout


def pack_linear_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> [ceil(N/64), ceil(K/2), 64, 2]: for each panel of 64 outputs, K in pairs,
    so one vector of 32 values holds the (k, k+1) weights of 16 outputs; zero padded."""
    n, k = weight.shape
    n_pad, k_pad = -n % PANEL, k % 2
    w = F.pad(weight, (0, k_pad, 0, n_pad))
    return w.view(w.shape[0] // PANEL, PANEL, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_linear_panels(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_linear_panels: the [n, k] weight."""
    return packed.permute(0, 2, 1, 3).reshape(packed.shape[0] * PANEL, -1)[:n, :k]


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K], packed: pack_linear_panels(weight [n, K]) -> [M, n]
    return linear(x, unpack_linear_panels(packed, n, x.shape[1]), bias, out)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    # x: [N, V] -> [N] int64: the first index of each row's maximum (of its first NaN, if any)
    return x.argmax(dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2*D] -> [T, D]
    d = x.shape[-1] // 2
    xf = _acc(x)
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    # x: [T, 2*D] -> [T, D]; approximate is "none" (erf) or "tanh"
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {approximate!r}")
    d = x.shape[-1] // 2
    xf = _acc(x)
    return (F.gelu(xf[..., :d], approximate=approximate) * xf[..., d:]).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    # x: [T, H, head_size] view, rotated in place over its first rot_dim = 2 * cos.shape[-1] dims.
    half = cos.shape[-1]
    rot = x[..., : 2 * half]
    rf = _acc(rot)
    cos, sin = cos.to(rf.dtype), sin.to(rf.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = rf[..., :half], rf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rf[..., 0::2], rf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    rot.copy_(out.to(x.dtype))


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    # positions: [T] int64; query: [T, Hq*head_size]; key: [T, Hk*head_size] or None (in place)
    # cos_sin_cache: [max_pos, rot_dim]: cos in [:, :rot_dim//2], sin in [:, rot_dim//2:]
    half = cos_sin_cache.shape[-1] // 2
    cs = _acc(cos_sin_cache)[positions.long()]
    cos, sin = cs[:, :half], cs[:, half:]
    for t in (query, key):
        if t is not None:
            _rotate(t.view(t.shape[0], -1, head_size), cos, sin, is_neox)


def fp8_kv_quantize(x: torch.Tensor) -> torch.Tensor:
    """x in the fp8 KV cache format (kv_cache_dtype="fp8"): float8_e4m3fn without subnormals.
    Magnitudes under 2^-7 store as 0, those in [2^-7, 2^-6) as 2^-6; the rest round to nearest
    even and saturate at 448 (torch's own conversion)."""
    xf = x.float()
    a = xf.abs()
    tiny = torch.where(a < 2.0 ** -7, xf * 0, torch.copysign(torch.full_like(xf, 2.0 ** -6), xf))
    return torch.where(a < 2.0 ** -6, tiny, xf).to(torch.float8_e4m3fn)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    # key/value: [T, Hk, hd]; caches: [num_blocks, block_size, Hk, hd]; slot -1 is skipped;
    # float8_e4m3fn caches take any float key/value, divided (in fp32) by k_scale / v_scale and
    # quantized (fp8_kv_quantize); other caches ignore the scales
    _check_kv_scales("reshape_and_cache", k_scale, v_scale)
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, kv_scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        rows = src[keep]
        if cache.dtype == torch.float8_e4m3fn:
            rows = fp8_kv_quantize(rows.float() / kv_scale if kv_scale != 1.0 else rows)
        else:
            rows = rows.to(cache.dtype)
        cache[blocks, offsets] = rows


def _check_kv_scales(op: str, k_scale: float, v_scale: float) -> None:
    if not all(math.isfinite(s) and s > 0 for s in (k_scale, v_scale)):
        raise ValueError(f"{op}: k_scale and v_scale must be positive and finite, got {k_scale} "
                         f"and {v_scale}")


def _gather_context(cache: torch.Tensor, block_row: torch.Tensor, ctx: int,
                    dtype: torch.dtype) -> torch.Tensor:
    # cache: [num_blocks, block_size, Hk, hd] -> [ctx, Hk, hd] in dtype (the accumulation type)
    block_size = cache.shape[1]
    nb = (ctx + block_size - 1) // block_size
    blocks = block_row[:nb].long()
    return cache[blocks].flatten(0, 1)[:ctx].to(dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, sliding_window: int = 0,
                    soft_cap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    # query: [T, Hq, hd]; caches: [num_blocks, block_size, Hk, hd]; query_start_loc: [S+1] int32;
    # seq_lens: [S] int32; block_table: [S, max_blocks] int32; returns out [T, Hq, hd]. An fp8
    # cache's keys are its values times k_scale, its values times v_scale (others ignore both).
    _check_kv_scales("paged_attention", k_scale, v_scale)
    if key_cache.dtype != torch.float8_e4m3fn:
        k_scale = v_scale = 1.0
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    acc_dtype = _acc(query[:0]).dtype
    slopes = None if alibi_slopes is None else alibi_slopes.to(acc_dtype).view(num_kv_heads, group, 1, 1)
    for s, ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        k = _gather_context(key_cache, block_table[s], ctx, acc_dtype).permute(1, 2, 0)  # [Hk, hd, ctx]
        v = _gather_context(value_cache, block_table[s], ctx, acc_dtype).transpose(0, 1)  # [Hk, ctx, hd]
        if k_scale != 1.0:
            k = k * k_scale
        if v_scale != 1.0:
            v = v * v_scale
        keys = torch.arange(ctx, device=query.device)
        # Chunk the query rows so a long prefill does not materialize [Hq, q_len, ctx] at once.
        for c0 in range(0, q_len, 256):
            c1 = min(q_len, c0 + 256)
            q = _acc(query[q0 + c0:q0 + c1]).view(c1 - c0, num_kv_heads, group, head_size)
            q = q.permute(1, 2, 0, 3)  # [Hk, group, rows, hd]
            logits = torch.matmul(q, k[:, None]) * scale  # [Hk, group, rows, ctx]
            if soft_cap > 0:
                logits = soft_cap * torch.tanh(logits / soft_cap)
            pos = ctx - q_len + torch.arange(c0, c1, device=query.device)  # [rows]
            rel = keys[None, :] - pos[:, None]  # [rows, ctx] = j - p
            if slopes is not None:
                logits = logits + slopes * rel
            allowed = rel <= 0
            if sliding_window > 0:
                allowed &= rel > -sliding_window
            logits = logits.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            o = torch.matmul(probs, v[:, None])  # [Hk, group, rows, hd]
            out[q0 + c0:q0 + c1] = o.permute(2, 0, 1, 3).reshape(c1 - c0, num_heads, head_size).to(out.dtype)
    return out


# ---- multi-head latent attention (MLA) over a paged latent cache ------------------------------

def check_mla_args(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> None:
    if q.dim() != 3 or kv_cache.dim() != 3 or q.shape[-1] != kv_cache.shape[-1]:
        raise ValueError(f"MLA attention takes q [T, H, L+R] and a latent cache [num_blocks, "
                         f"block_size, L+R]; got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    if not 0 < kv_lora_rank <= kv_cache.shape[-1]:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must be in (0, {kv_cache.shape[-1]}]")


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    # kv_c: [T, L] (normed latent), k_pe: [T, R] (rotated key) -> kv_cache [num_blocks,
    # block_size, L+R] at slot_mapping [T] (-1 skipped)
    block_size = kv_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_cache[slots // block_size, slots % block_size] = torch.cat(
        [kv_c[keep], k_pe[keep]], dim=-1).to(kv_cache.dtype)


def mla_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                        kv_lora_rank: int) -> torch.Tensor:
    """Causal attention of every head over one shared latent per token: q [T, H, L+R] (the
    absorbed q_nope @ W_UK, then the rotated q_pe) against keys kv_cache[..., :L+R], values
    kv_cache[..., :L] -> out [T, H, L] (still to be multiplied by W_UV). query_start_loc [S+1],
    seq_lens [S] (context including this step's rows, which are its last ones), block_table
    [S, max_blocks]: as paged_attention."""
    check_mla_args(q, kv_cache, kv_lora_rank)
    num_tokens, num_heads, _ = q.shape
    out = q.new_empty(num_tokens, num_heads, kv_lora_rank)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    block_size = kv_cache.shape[1]
    for s, ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        blocks = block_table[s, :(ctx + block_size - 1) // block_size].long()
        latent = _acc(kv_cache[blocks].flatten(0, 1)[:ctx])          # [ctx, L+R]
        logits = torch.einsum("thd,cd->htc", _acc(q[q0:q1]), latent) * scale
        pos = ctx - (q1 - q0) + torch.arange(q1 - q0, device=q.device)  # each row's position
        future = torch.arange(ctx, device=q.device)[None, :] > pos[:, None]
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        out[q0:q1] = torch.einsum("htc,cl->thl", probs, latent[:, :kv_lora_rank]).to(out.dtype)
    return out


# ---- mixture of experts: routing, alignment into expert tiles, the expert MLPs ----------------

_SCORINGS = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")
_MOE_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def check_topk_routing_args(gating_output: torch.Tensor, top_k: int, scoring: str,
                            bias: torch.Tensor | None, n_group: int, topk_group: int,
                            group_score: str) -> None:
    """Raises ValueError (saying what to change) on arguments topk_routing cannot honour."""
    if gating_output.dim() != 2:
        raise ValueError(f"topk_routing: gating_output must be [T, E], got {tuple(gating_output.shape)}")
    e = gating_output.shape[1]
    if scoring not in _SCORINGS:
        raise ValueError(f"topk_routing: scoring must be one of {_SCORINGS}, got {scoring!r}")
    if group_score not in _GROUP_SCORES:
        raise ValueError(f"topk_routing: group_score must be one of {_GROUP_SCORES}, got {group_score!r}")
    if bias is not None and tuple(bias.shape) != (e,):
        raise ValueError(f"topk_routing: bias must be [E] = [{e}], got {tuple(bias.shape)}")
    if n_group < 1 or e % n_group != 0:
        raise ValueError(f"topk_routing: n_group ({n_group}) must divide the {e} experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_routing: topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if group_score == "top2_sum" and n_group > 1 and e // n_group < 2:
        raise ValueError("topk_routing: group_score 'top2_sum' needs at least 2 experts per group")
    allowed = e if n_group == 1 else topk_group * (e // n_group)
    if not 1 <= top_k <= allowed:
        raise ValueError(f"topk_routing: top_k must be in [1, {allowed}] (experts in the chosen "
                         f"groups), got {top_k}")


def topk_routing(gating_output: torch.Tensor, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True, bias: torch.Tensor | None = None, n_group: int = 1,
                 topk_group: int = 1, group_score: str = "max",
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # gating_output: [T, E] router logits -> (weights [T, top_k] fp32, ids [T, top_k] int32).
    # bias only steers the choice (DeepSeek-V3 noaux_tc); weights are the unbiased scores.
    check_topk_routing_args(gating_output, top_k, scoring, bias, n_group, topk_group, group_score)
    t, e = gating_output.shape
    logits = gating_output.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        groups = choice.view(t, n_group, e // n_group)
        if group_score == "max":
            gscore = groups.amax(-1)
        else:
            gscore = groups.sort(-1, descending=True).values[..., :2].sum(-1)
        keep = gscore.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        mask = torch.zeros(t, n_group, dtype=torch.bool, device=choice.device)
        mask.scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(e // n_group, 1), float("-inf"))
    # a stable descending sort: among equal scores the lower expert id comes first
    ids = choice.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def moe_align_sizes(num_pairs: int, num_experts: int, block_size: int) -> tuple[int, int]:
    """(P, P // block_size): the padded length of moe_align's outputs, from shapes only (so a
    CUDA graph can capture it): every non-empty expert wastes at most block_size - 1 slots."""
    p = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    p = (p + block_size - 1) // block_size * block_size
    return p, p // block_size


def check_moe_align_args(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32:
        raise ValueError(f"moe_align: topk_ids must be a [T, k] int32 tensor, got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if num_experts < 1 or block_size < 1:
        raise ValueError(f"moe_align: num_experts ({num_experts}) and block_size ({block_size}) "
                         "must be positive")


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # topk_ids: [T, k] int32 -> sorted_token_ids [P] int32 (pair index t*k + j grouped by expert,
    # in pair order inside an expert, each run padded to a multiple of block_size with T*k),
    # expert_ids [P // block_size] int32 (-1 past the used tiles), num_tokens_post_pad [1] int32.
    check_moe_align_args(topk_ids, num_experts, block_size)
    flat = topk_ids.flatten().long()
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"moe_align: expert ids must be in [0, {num_experts})")
    p, nblocks = moe_align_sizes(n, num_experts, block_size)
    dev = topk_ids.device
    sorted_ids = torch.full((p,), n, dtype=torch.int32, device=dev)
    expert_ids = torch.full((nblocks,), -1, dtype=torch.int32, device=dev)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    order = flat.sort(stable=True).indices
    pos, src = 0, 0
    for ex, c in enumerate(counts):
        if c == 0:
            continue
        sorted_ids[pos:pos + c] = order[src:src + c].to(torch.int32)
        padded = (c + block_size - 1) // block_size * block_size
        expert_ids[pos // block_size:(pos + padded) // block_size] = ex
        pos, src = pos + padded, src + c
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=dev)


def check_fused_moe_args(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         activation: str) -> None:
    """Raises ValueError (saying what to change) on inconsistent fused_moe arguments."""
    if activation not in _MOE_ACTIVATIONS:
        raise ValueError(f"fused_moe: activation must be one of {tuple(_MOE_ACTIVATIONS)}, "
                         f"got {activation!r}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], got "
                         f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    t, h = hidden.shape
    e, i2, h13 = w13.shape
    if i2 % 2 or h13 != h or tuple(w2.shape) != (e, h, i2 // 2):
        raise ValueError(f"fused_moe: w13 must be [E, 2I, {h}] and w2 [E, {h}, I], got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.dtype != torch.int32:
        raise ValueError(f"fused_moe: topk_ids must be [T={t}, k] int32, got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: topk_weights must be {tuple(topk_ids.shape)} float32, got "
                         f"{tuple(topk_weights.shape)} {topk_weights.dtype}")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu") -> torch.Tensor:
    # hidden: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    # topk_weights: [T, k] fp32; topk_ids: [T, k] int32 -> out [T, H] in hidden's dtype.
    # out[t] = sum_j w[t, j] * w2[e] @ (act(gate_e @ h) * (up_e @ h)), fp32 accumulation.
    check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, activation)
    return _fused_moe_experts(hidden, lambda ex: (w13[ex], w2[ex]), w13.shape[0],
                              w13.shape[1] // 2, topk_weights, topk_ids, activation)


def _fused_moe_experts(hidden, expert, e: int, i: int, topk_weights, topk_ids, activation):
    # expert(ex) -> (w13 [2I, H], w2 [H, I]) of one expert, read only for the experts chosen
    act = _MOE_ACTIVATIONS[activation]
    t, k = topk_ids.shape
    flat = topk_ids.flatten().long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= e):
        raise ValueError(f"fused_moe: expert ids must be in [0, {e})")
    tokens = torch.arange(t, device=hidden.device).repeat_interleave(k)
    pair_w = _acc(topk_weights.flatten())
    out = torch.zeros(t, hidden.shape[1], dtype=_acc(hidden[:0]).dtype, device=hidden.device)
    for ex in flat.unique().tolist():
        sel = flat == ex
        rows = tokens[sel]
        w13_e, w2_e = expert(ex)
        gate_up = _acc(hidden[rows]) @ w13_e.to(out.dtype).t()
        inter = act(gate_up[:, :i]) * gate_up[:, i:]
        out.index_add_(0, rows, (inter @ w2_e.to(out.dtype).t()) * pair_w[sel, None])
    return out.to(hidden.dtype)


def moe_panels_view(w: torch.Tensor) -> torch.Tensor:
    """pack_moe_panels(w) as a strided view of w (of a zero-padded copy where N or K need it)."""
    e, n, k = w.shape
    if k % 2 or n % PANEL:
        w = F.pad(w, (0, k % 2, 0, -n % PANEL))
    return w.reshape(e, w.shape[1] // PANEL, PANEL, w.shape[2] // 2, 2).permute(0, 1, 3, 2, 4)


def pack_moe_panels(w: torch.Tensor) -> torch.Tensor:
    """w [E, N, K] -> [E, ceil(N/64), ceil(K/2), 64, 2]: pack_linear_panels of every expert."""
    return moe_panels_view(w).contiguous()


def pack_moe_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's layout: w13 [E, 2I, H] -> [E, ceil(I/64), 2, ceil(H/2), 64, 2] (each
    panel of 64 gate rows beside the matching 64 up rows), w2 [E, H, I] -> pack_moe_panels(w2)."""
    i = w13.shape[1] // 2
    return (torch.stack((pack_moe_panels(w13[:, :i]), pack_moe_panels(w13[:, i:])), dim=2),
            pack_moe_panels(w2))


def unpack_moe_weights(w13_packed: torch.Tensor, w2_packed: torch.Tensor, hidden_size: int,
                       inter_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_moe_weights: (w13 [E, 2I, H], w2 [E, H, I])."""
    def unpack(p, n, k):  # [E, N/64, K/2, 64, 2] -> [E, n, k]
        return p.permute(0, 1, 3, 2, 4).reshape(p.shape[0], p.shape[1] * PANEL, -1)[:, :n, :k]
    gate = unpack(w13_packed[:, :, 0], inter_size, hidden_size)
    up = unpack(w13_packed[:, :, 1], inter_size, hidden_size)
    return torch.cat((gate, up), 1), unpack(w2_packed, hidden_size, inter_size)


def prepare_moe_weights(w13: torch.Tensor, w2: torch.Tensor):
    """The expert weights in the form fused_moe_prepared takes (here: unchanged)."""
    return (w13, w2)


def fused_moe_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: what prepare_moe_weights returned
    w13, w2 = prepared
    return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)


# ---- INT4 weight-only GEMM -----------------------------------------------------------------
# A 4-bit weight is codes q [N, K] (0..15), scales [N, G] and zero points [N, G] (None:
# symmetric, zero point 8): W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] with g = g_idx[k],
# or k // group_size without g_idx (group_size -1: one group per output channel).

INT4_PANEL = 32  # outputs per panel of the packed INT4 layout


def int4_groups(k: int, group_size: int) -> tuple[int, int]:
    """(group size, number of groups) of K; group_size -1 is per-channel (one group of K)."""
    gs = k if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"int4 group_size must be positive or -1 (per channel), got {group_size}")
    return gs, -(-k // gs)


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """codes [N, K], scales / zeros [N, G] -> the fp32 weight [N, K]."""
    n, k = qweight.shape
    gs, _ = int4_groups(k, group_size)
    g = g_idx.long() if g_idx is not None else torch.arange(k, device=qweight.device) // gs
    s = scales.float()[:, g]
    z = 8.0 if zeros is None else zeros.float()[:, g]
    return (qweight.float() - z) * s


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor | None = None, group_size: int = 128,
              g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] -> [M, N]: dequantize, then matmul (in fp32, fp64 for fp64 x)
    w = int4_dequantize(qweight, scales, zeros, group_size, g_idx)
    return linear(x, w.to(_acc(x).dtype), bias)


def int4_act_order(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """The K permutation that makes each group contiguous (GPTQ act-order), or None when the
    groups already are. Raises ValueError unless every group but the last has group_size
    members (as GPTQ's g_idx = position // group_size always does)."""
    gs, groups = int4_groups(k, group_size)
    if g_idx is None:
        return None
    g = g_idx.long().cpu()
    if g.shape != (k,) or (k and (int(g.min()) < 0 or int(g.max()) >= groups)):
        raise ValueError(f"g_idx must be [{k}] group indices in [0, {groups})")
    if torch.equal(g, torch.arange(k) // gs):
        return None
    counts = torch.bincount(g, minlength=groups)
    expect = torch.full((groups,), gs)
    expect[-1] = k - gs * (groups - 1)
    if not torch.equal(counts, expect):
        raise ValueError("g_idx groups must each hold group_size columns (the last may hold "
                         "fewer) to be packed for the INT4 kernel")
    return torch.sort(g, stable=True).indices


def pack_int4_panels(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's layout of W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // gs:
    codes [N, K] -> uint8 [ceil(N/32), ceil(K/2), 32], byte 2j+i of row kk holding the code of
    (output j, k = 2kk+i) in its low nibble and of (output j+16, same k) in its high nibble;
    scales / offsets [N, G] -> float32 [ceil(N/32), G, 2, 32]. Zero padded."""
    n, k = qweight.shape
    _, groups = int4_groups(k, group_size)
    n_pad = -n % INT4_PANEL
    q = F.pad(qweight.to(torch.uint8), (0, k % 2, 0, n_pad))
    p, k2 = q.shape[0] // INT4_PANEL, q.shape[1] // 2
    q = q.view(p, 2, 16, k2, 2)                       # [P, half, j, kk, i]
    packed = (q[:, 0] | (q[:, 1] << 4)).permute(0, 2, 1, 3).reshape(p, k2, INT4_PANEL)
    so = torch.stack((scales.float(), offsets.float()), dim=1)   # [N, 2, G]
    so = F.pad(so, (0, 0, 0, 0, 0, n_pad)).view(p, INT4_PANEL, 2, groups).permute(0, 3, 2, 1)
    return packed.contiguous(), so.contiguous()


def unpack_int4_panels(packed: torch.Tensor, scales_offsets: torch.Tensor, n: int, k: int,
                       group_size: int) -> torch.Tensor:
    """The fp32 weight [n, k] that pack_int4_panels' output stands for."""
    p, k2, _ = packed.shape
    lo, hi = packed & 15, packed >> 4                                   # [P, K2, 32]
    q = torch.stack((lo, hi), 1).view(p, 2, k2, 16, 2).permute(0, 1, 3, 2, 4)
    q = q.reshape(p * INT4_PANEL, 2 * k2)[:n, :k].float()
    gs, _ = int4_groups(k, group_size)
    g = torch.arange(k, device=packed.device) // gs
    so = scales_offsets.permute(0, 3, 2, 1).reshape(p * INT4_PANEL, 2, -1)[:n]
    return q * so[:, 0][:, g] + so[:, 1][:, g]


def int4_gemm_packed(x: torch.Tensor, packed: torch.Tensor, scales_offsets: torch.Tensor, n: int,
                     group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] (K in the packed order) -> [M, n]
    w = unpack_int4_panels(packed, scales_offsets, n, x.shape[1], group_size)
    return linear(x, w.to(_acc(x).dtype), bias)


def int4_prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, g_idx: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, pack=None):
    """Repack a 4-bit weight once after loading for int4_gemm_prepared (ops.Int4Weight).
    `offsets` [N, G], when given, replaces -zeros * scales (GGUF's Q4_1 min, exactly). `pack`:
    what packs the codes (pack_int4_panels's signature; ops.int4_prepare passes the C++ one)."""
    from octavo.ops import Int4Weight
    n, k = qweight.shape
    gs, _ = int4_groups(k, group_size)
    perm = int4_act_order(g_idx, k, group_size)
    if perm is not None:
        qweight = qweight[:, perm.to(qweight.device)]
    if offsets is None:
        z = torch.full_like(scales, 8.0, dtype=torch.float32) if zeros is None else zeros.float()
        offsets = -z * scales.float()
    elif perm is not None:
        raise ValueError("int4_prepare: offsets with act-order g_idx are not supported")
    packed, so = (pack or pack_int4_panels)(qweight, scales, offsets, gs)
    return Int4Weight(packed, so, n, k, gs, perm)


def int4_gemm_prepared(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: int4_prepare(...)
    x2 = x.reshape(-1, x.shape[-1])
    if w.perm is not None:
        x2 = x2[:, w.perm.to(x.device)]
    out = int4_gemm_packed(x2, w.packed, w.scales_offsets, w.n, w.group_size, bias)
    return out.view(*x.shape[:-1], w.n)


# ---- INT4 MoE: fused MoE over 4-bit experts ----------------------------------------------------
# Each expert stack uses the INT4 GEMM convention above with a leading expert dim: w13 codes
# uint8 [E, 2I, H] (gate rows, then up rows), w2 codes [E, H, I], 0..15; scales [E, N, G]; zeros
# [E, N, G] or None (symmetric, 8); offsets [E, N, G], when given, replace -zeros * scales
# exactly as int4_prepare's do; g_idx [E, K] per expert (or [K] shared), when given, is GPTQ's
# act order: column k of an expert belongs to group g_idx[k]. One group_size for both stacks
# (-1: per output channel, so G is 1 and the group spans H for w13, I for w2).
# The packed form (prepare_moe_int4_weights -> ops.MoEInt4Weights), read by the registered op
# fused_moe_int4_packed(out, hidden, w13_packed, w2_packed, w13_scales_offsets,
# w2_scales_offsets, topk_weights, topk_ids, inter_size, group_size, activation, w13_perm):
#   w13_packed uint8 [E, 2 * ceil(I/32), ceil(H/2), 32] and w13_scales_offsets float32
#   [E, 2 * ceil(I/32), G13, 2, 32]: pack_int4_panels of each expert's gate rows and up rows,
#   each padded to whole 32-row panels, so panel p < ceil(I/32) holds gate rows 32p.. and panel
#   ceil(I/32) + p the matching up rows;
#   w2_packed uint8 [E, ceil(H/32), ceil(I/2), 32], w2_scales_offsets [E, ceil(H/32), G2, 2, 32];
#   w13_perm int32 [E, H] or None: act-order w13 columns sorted by group, so that every group is
#   contiguous; packed column c of expert e multiplies hidden[:, w13_perm[e, c]].
# An act-order w2 needs nothing at run time: its columns (the intermediate) are sorted by group
# and the gate and up rows of the same expert follow that order, so act(gate) * up comes out
# already permuted (the ops.MoEInt4Weights keeps the order as inter_perm for unpacking only).

def _moe_int4_stack_shapes(q: torch.Tensor, scales: torch.Tensor, zeros, offsets, group_size: int,
                           name: str, g_idx: torch.Tensor | None = None) -> None:
    if q.dim() != 3:
        raise ValueError(f"fused_moe_int4: {name} codes must be [E, N, K], got {tuple(q.shape)}")
    e, n, k = q.shape
    _, groups = int4_groups(k, group_size)
    for what, t in (("scales", scales), ("zeros", zeros), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != (e, n, groups):
            raise ValueError(f"fused_moe_int4: {name} {what} must be [E, N, G] = "
                             f"{[e, n, groups]} (group_size {group_size}), got {list(t.shape)}")
    if g_idx is not None:
        if tuple(g_idx.shape) not in ((k,), (e, k)):
            raise ValueError(f"fused_moe_int4: {name} g_idx must be [K] or [E, K] = {[e, k]}, got "
                             f"{list(g_idx.shape)}")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"fused_moe_int4: {name} g_idx must hold group indices in "
                             f"[0, {groups})")


def check_fused_moe_int4_args(hidden, w13_q, w13_scales, w13_zeros, w2_q, w2_scales, w2_zeros,
                              topk_weights, topk_ids, group_size, activation,
                              w13_offsets=None, w2_offsets=None, w13_g_idx=None,
                              w2_g_idx=None) -> None:
    """Raises ValueError (saying what to change) on inconsistent fused_moe_int4 arguments."""
    if w13_q.dim() != 3 or w2_q.dim() != 3:
        raise ValueError(f"fused_moe_int4: expected codes w13 [E, 2I, H] and w2 [E, H, I], got "
                         f"{tuple(w13_q.shape)} and {tuple(w2_q.shape)}")
    check_fused_moe_args(hidden, w13_q.new_empty(w13_q.shape, device="meta"),
                         w2_q.new_empty(w2_q.shape, device="meta"), topk_weights, topk_ids,
                         activation)
    _moe_int4_stack_shapes(w13_q, w13_scales, w13_zeros, w13_offsets, group_size, "w13", w13_g_idx)
    _moe_int4_stack_shapes(w2_q, w2_scales, w2_zeros, w2_offsets, group_size, "w2", w2_g_idx)


def moe_int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        group_size: int, offsets: torch.Tensor | None = None,
                        g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's (or a stack's) codes [..., N, K] -> the fp32 weight [..., N, K]; g_idx
    [..., K] (act order) names each column's group, else column k is in group k // group_size."""
    k = q.shape[-1]
    gs, _ = int4_groups(k, group_size)
    g = torch.arange(k, device=q.device) // gs if g_idx is None else g_idx.to(q.device).long()
    idx = g.unsqueeze(-2).expand(q.shape)                       # [..., N, K]: each weight's group
    s = scales.float().gather(-1, idx)
    if offsets is not None:
        return q.float() * s + offsets.float().gather(-1, idx)
    z = 8.0 if zeros is None else zeros.float().gather(-1, idx)
    return (q.float() - z) * s


def fused_moe_int4(hidden: torch.Tensor, w13_q: torch.Tensor, w13_scales: torch.Tensor,
                   w13_zeros: torch.Tensor | None, w2_q: torch.Tensor, w2_scales: torch.Tensor,
                   w2_zeros: torch.Tensor | None, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, group_size: int, activation: str = "silu",
                   w13_offsets: torch.Tensor | None = None,
                   w2_offsets: torch.Tensor | None = None,
                   w13_g_idx: torch.Tensor | None = None,
                   w2_g_idx: torch.Tensor | None = None) -> torch.Tensor:
    # fused_moe with 4-bit experts: each chosen expert dequantized (with its g_idx, if any), then
    # the same gated MLP in fp32 -> out [T, H] in hidden's dtype
    check_fused_moe_int4_args(hidden, w13_q, w13_scales, w13_zeros, w2_q, w2_scales, w2_zeros,
                              topk_weights, topk_ids, group_size, activation, w13_offsets,
                              w2_offsets, w13_g_idx, w2_g_idx)

    def pick(t, ex):
        return None if t is None else t[ex]

    def pick_g(g, ex):
        return None if g is None else g if g.dim() == 1 else g[ex]

    def expert(ex: int):
        return (moe_int4_dequantize(w13_q[ex], w13_scales[ex], pick(w13_zeros, ex), group_size,
                                    pick(w13_offsets, ex), pick_g(w13_g_idx, ex)),
                moe_int4_dequantize(w2_q[ex], w2_scales[ex], pick(w2_zeros, ex), group_size,
                                    pick(w2_offsets, ex), pick_g(w2_g_idx, ex)))
    return _fused_moe_experts(hidden, expert, w13_q.shape[0], w13_q.shape[1] // 2, topk_weights,
                              topk_ids, activation)


def _moe_int4_offsets(scales: torch.Tensor, zeros: torch.Tensor | None,
                      offsets: torch.Tensor | None) -> torch.Tensor:
    if offsets is not None:
        return offsets.float()
    z = torch.full_like(scales, 8.0, dtype=torch.float32) if zeros is None else zeros.float()
    return -z * scales.float()


def _pack_int4_experts(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                       group_size: int, pack=None) -> tuple[torch.Tensor, torch.Tensor]:
    # [E, N, K] -> (uint8 [E, ceil(N/32), ceil(K/2), 32], float32 [E, ceil(N/32), G, 2, 32])
    gs, groups = int4_groups(q.shape[2], group_size)
    if q.shape[0] == 0:
        p = -(-q.shape[1] // INT4_PANEL)
        return (q.new_zeros(0, p, (q.shape[2] + 1) // 2, INT4_PANEL, dtype=torch.uint8),
                q.new_zeros(0, p, groups, 2, INT4_PANEL, dtype=torch.float32))
    parts = [(pack or pack_int4_panels)(q[x], scales[x], offsets[x], gs) for x in range(q.shape[0])]
    return torch.stack([a for a, _ in parts]), torch.stack([b for _, b in parts])


def moe_int4_act_order(g_idx: torch.Tensor | None, e: int, k: int, group_size: int,
                       name: str) -> torch.Tensor | None:
    """g_idx [E, K] (or [K] shared) -> int64 [E, K]: each expert's K order with its groups
    contiguous (int4_act_order; the identity where an expert's groups already are), or None when
    no expert is in act order."""
    if g_idx is None:
        return None
    g = g_idx.expand(e, k) if g_idx.dim() == 1 else g_idx
    try:
        perms = [int4_act_order(g[x], k, group_size) for x in range(e)]
    except ValueError as err:
        raise ValueError(f"INT4 MoE experts: {name} {err}") from None
    if all(p is None for p in perms):
        return None
    return torch.stack([torch.arange(k) if p is None else p for p in perms])


def _rows(t: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    # t [E, N, C], order [E, N'] -> t[e, order[e]] [E, N', C]
    if t is None:
        return None
    return t.gather(1, order.to(t.device)[..., None].expand(-1, -1, t.shape[2]))


def _cols(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    # t [E, N, K], order [E, K] -> t[e, :, order[e]]
    return t.gather(2, order.to(t.device)[:, None, :].expand(-1, t.shape[1], -1))


def prepare_moe_int4_weights(w13_q: torch.Tensor, w13_scales: torch.Tensor,
                             w13_zeros: torch.Tensor | None, w2_q: torch.Tensor,
                             w2_scales: torch.Tensor, w2_zeros: torch.Tensor | None,
                             group_size: int, w13_offsets: torch.Tensor | None = None,
                             w2_offsets: torch.Tensor | None = None,
                             w13_g_idx: torch.Tensor | None = None,
                             w2_g_idx: torch.Tensor | None = None, pack=None):
    """Pack 4-bit experts once after loading (layout above) -> ops.MoEInt4Weights. g_idx (per
    expert [E, K] or shared [K]) may be GPTQ's act order: every group but the last holds exactly
    group_size columns, as GPTQ writes it (else ValueError). `pack`: what packs each expert
    (pack_int4_panels's signature; ops.prepare_moe_int4_weights passes the C++ one)."""
    from octavo.ops import MoEInt4Weights
    e, i2, h = w13_q.shape
    i = i2 // 2
    _moe_int4_stack_shapes(w13_q, w13_scales, w13_zeros, w13_offsets, group_size, "w13", w13_g_idx)
    _moe_int4_stack_shapes(w2_q, w2_scales, w2_zeros, w2_offsets, group_size, "w2", w2_g_idx)
    if i2 % 2 or tuple(w2_q.shape) != (e, h, i):
        raise ValueError(f"prepare_moe_int4_weights: w13 must be [E, 2I, H] and w2 [E, H, I], got "
                         f"{tuple(w13_q.shape)} and {tuple(w2_q.shape)}")
    off13 = _moe_int4_offsets(w13_scales, w13_zeros, w13_offsets)
    off2 = _moe_int4_offsets(w2_scales, w2_zeros, w2_offsets)
    perm13 = moe_int4_act_order(w13_g_idx, e, h, group_size, "w13")
    inter = moe_int4_act_order(w2_g_idx, e, i, group_size, "w2")
    if inter is not None:   # w2's columns by group; the gate and up rows in the same order
        rows = torch.cat((inter, inter + i), 1)
        w13_q, w13_scales, off13 = _rows(w13_q, rows), _rows(w13_scales, rows), _rows(off13, rows)
        w2_q = _cols(w2_q, inter)
    if perm13 is not None:  # w13's columns by group; the kernel gathers hidden in this order
        w13_q = _cols(w13_q, perm13)
    # gate and up rows padded separately, so a panel never mixes them
    gate = _pack_int4_experts(w13_q[:, :i], w13_scales[:, :i], off13[:, :i], group_size, pack)
    up = _pack_int4_experts(w13_q[:, i:], w13_scales[:, i:], off13[:, i:], group_size, pack)
    w2p, w2so = _pack_int4_experts(w2_q, w2_scales, off2, group_size, pack)
    dev = w13_q.device
    return MoEInt4Weights(torch.cat((gate[0], up[0]), 1).contiguous(),
                          torch.cat((gate[1], up[1]), 1).contiguous(), w2p, w2so, h, i, group_size,
                          None if perm13 is None else perm13.to(dev, torch.int32).contiguous(),
                          None if inter is None else inter.to(dev))


def unpack_moe_int4_weights(prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 experts (w13 [E, 2I, H], w2 [E, H, I]) that an ops.MoEInt4Weights stands for, in
    the order of the codes prepare_moe_int4_weights was given."""
    p = prepared
    h, i = p.hidden_size, p.inter_size
    pi = -(-i // INT4_PANEL)

    def unpack(packed, so, n, k):
        return torch.stack([unpack_int4_panels(packed[x], so[x], n, k, p.group_size)
                            for x in range(packed.shape[0])]) if packed.shape[0] else \
            packed.new_zeros(0, n, k, dtype=torch.float32)
    gate = unpack(p.w13[:, :pi], p.w13_scales_offsets[:, :pi], i, h)
    up = unpack(p.w13[:, pi:], p.w13_scales_offsets[:, pi:], i, h)
    w13, w2 = torch.cat((gate, up), 1), unpack(p.w2, p.w2_scales_offsets, h, i)
    if p.w13_perm is not None:      # packed column c is column w13_perm[e, c]
        perm = p.w13_perm.long().to(w13.device)
        w13 = torch.empty_like(w13).scatter_(2, perm[:, None, :].expand_as(w13), w13)
    if p.inter_perm is not None:    # packed intermediate j is row / column inter_perm[e, j]
        inter = p.inter_perm.long().to(w13.device)
        rows = torch.cat((inter, inter + i), 1)[..., None].expand_as(w13)
        w13 = torch.empty_like(w13).scatter_(1, rows, w13)
        w2 = torch.empty_like(w2).scatter_(2, inter[:, None, :].expand_as(w2), w2)
    return w13, w2


def fused_moe_int4_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: prepare_moe_int4_weights(...) -> out [T, H]
    w13, w2 = unpack_moe_int4_weights(prepared)
    return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
# ---- end INT4 MoE ----


# ---- LoRA: batched shrink / expand over rows that use different adapter slots ----------------
# punica's BGMV/SGMV shape: slot s of the stacked weights holds one adapter; row t uses slot
# indices[t], or none when indices[t] == -1. The rank-sized intermediate is float32.

def check_lora_shrink_args(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3 or indices.dim() != 1:
        raise ValueError(f"lora_shrink: expected x [T, K], w [L, R, K], indices [T], got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(indices.shape)}")
    if w.shape[2] != x.shape[1] or indices.shape[0] != x.shape[0]:
        raise ValueError(f"lora_shrink: shapes do not match: x {tuple(x.shape)}, w "
                         f"{tuple(w.shape)}, indices {tuple(indices.shape)}")
    if w.dtype != x.dtype:
        raise ValueError(f"lora_shrink: w is {w.dtype} but x is {x.dtype}")


def check_lora_expand_args(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                           indices: torch.Tensor, offset: int) -> None:
    if out.dim() != 2 or x.dim() != 2 or w.dim() != 3 or indices.dim() != 1:
        raise ValueError(f"lora_expand: expected out [T, N_total], x [T, R], w [L, N, R], "
                         f"indices [T], got {tuple(out.shape)}, {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(indices.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"lora_expand: x (the shrink output) must be float32, got {x.dtype}")
    if (w.shape[2] != x.shape[1] or x.shape[0] != out.shape[0]
            or indices.shape[0] != out.shape[0]):
        raise ValueError(f"lora_expand: shapes do not match: out {tuple(out.shape)}, x "
                         f"{tuple(x.shape)}, w {tuple(w.shape)}, indices {tuple(indices.shape)}")
    if not 0 <= offset <= out.shape[1] - w.shape[1]:
        raise ValueError(f"lora_expand: columns [{offset}, {offset + w.shape[1]}) are outside "
                         f"out's {out.shape[1]}")
    if w.dtype != out.dtype:
        raise ValueError(f"lora_expand: w is {w.dtype} but out is {out.dtype}")


def lora_shrink(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    # x: [T, K], w: [L, R, K], indices: [T] (-1: no adapter) -> [T, R] float32
    # out[t] = scale * w[indices[t]] @ x[t]; rows without an adapter are 0
    check_lora_shrink_args(x, w, indices)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        rows = indices == slot
        out[rows] = scale * (x[rows].float() @ w[slot].float().t())
    return out


def lora_expand(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor,
                offset: int = 0) -> None:
    # in place: out[t, offset:offset + N] += w[indices[t]] @ x[t] (summed in float32, rounded
    # once); out: [T, N_total], x: [T, R] float32, w: [L, N, R]; rows with index -1 unchanged
    check_lora_expand_args(out, x, w, indices, offset)
    n = w.shape[1]
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        rows = indices == slot
        cols = out[rows, offset:offset + n].float() + x[rows] @ w[slot].float().t()
        out[rows, offset:offset + n] = cols.to(out.dtype)


# ---- state-space models (Mamba-1): causal conv1d, selective scan, decode updates ------------
# Flat varlen batches (rows query_start_loc[b]:query_start_loc[b+1] belong to sequence b) over
# per-layer state slots: sequence b reads slot state_indices[b] when has_initial_state[b] (None:
# all True), else starts from zeros, and writes its final state back into that slot. A negative
# state index marks a padding sequence (CUDA-graph buckets): its state is neither read nor
# written and its output rows are zero. A sequence with no tokens leaves its slot as it is.

_SSM_ACTIVATIONS = (None, "silu", "swish")


def _ssm_acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # fp64 anywhere (the tests' exact reference) computes in fp64, everything else in fp32
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _check_ssm_batch(op: str, num_states: int, query_start_loc: torch.Tensor | None,
                     state_indices: torch.Tensor, has_initial_state: torch.Tensor | None,
                     num_seqs: int, num_tokens: int | None = None, values: bool = True) -> None:
    # values=False: shapes and dtypes only (the kernels check the index values themselves)
    if state_indices.dim() != 1 or state_indices.shape[0] != num_seqs \
            or state_indices.dtype != torch.int32:
        raise ValueError(f"{op}: state_indices must be int32 [{num_seqs}], got "
                         f"{state_indices.dtype} {tuple(state_indices.shape)}")
    if query_start_loc is not None and (query_start_loc.dim() != 1
                                        or query_start_loc.shape[0] != num_seqs + 1
                                        or query_start_loc.dtype != torch.int32):
        raise ValueError(f"{op}: query_start_loc must be int32 [B+1] = [{num_seqs + 1}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    if has_initial_state is not None and (has_initial_state.dtype != torch.bool
                                          or tuple(has_initial_state.shape) != (num_seqs,)):
        raise ValueError(f"{op}: has_initial_state must be bool [{num_seqs}], got "
                         f"{has_initial_state.dtype} {tuple(has_initial_state.shape)}")
    if values and state_indices.device.type == "cpu" and num_seqs:
        # on CPU these checks are free; on CUDA they would synchronize (and break graph capture)
        if int(state_indices.max()) >= num_states:
            raise ValueError(f"{op}: state_indices must be < the {num_states} state slots, got "
                             f"{int(state_indices.max())}")
        if query_start_loc is not None:
            q = query_start_loc
            if int(q[0]) != 0 or bool((q[1:] < q[:-1]).any()) or int(q[-1]) != num_tokens:
                raise ValueError(f"{op}: query_start_loc must rise from 0 to the {num_tokens} "
                                 f"tokens, got {q.tolist()}")


def check_causal_conv1d_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             conv_states: torch.Tensor, activation: str | None,
                             op: str = "causal_conv1d") -> None:
    """Raises ValueError (saying what to change) on inconsistent conv shapes."""
    if activation not in _SSM_ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_SSM_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be [T, D] and weight [D, W], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    d, w = weight.shape
    if x.shape[1] != d or w < 1:
        raise ValueError(f"{op}: weight must be [D={x.shape[1]}, W>=1], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{op}: bias must be [{d}], got {tuple(bias.shape)}")
    if conv_states.dim() != 3 or tuple(conv_states.shape[1:]) != (d, w - 1):
        raise ValueError(f"{op}: conv_states must be [S, {d}, {w - 1}], got "
                         f"{tuple(conv_states.shape)}")


def _conv_act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return y if activation is None else F.silu(y)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_states: torch.Tensor, query_start_loc: torch.Tensor,
                  state_indices: torch.Tensor, has_initial_state: torch.Tensor | None = None,
                  activation: str | None = "silu") -> torch.Tensor:
    # x: [T, D], weight: [D, W], bias: [D], conv_states: [S, D, W-1] (oldest column first)
    # -> out [T, D]; out[t] = act(bias + sum_j weight[:, j] * xx[t - (W-1) + j]) over the sequence
    # preceded by its W-1 state columns; the slot gets the last W-1 columns of that sequence.
    check_causal_conv1d_args(x, weight, bias, conv_states, activation)
    nseq = state_indices.shape[0]
    _check_ssm_batch("causal_conv1d", conv_states.shape[0], query_start_loc, state_indices,
                     has_initial_state, nseq, x.shape[0])
    acc = _ssm_acc_dtype(x, weight)
    d, w = weight.shape
    out = torch.zeros_like(x)
    starts = query_start_loc.tolist()
    slots = state_indices.tolist()
    init = [True] * nseq if has_initial_state is None else has_initial_state.tolist()
    for b in range(nseq):
        s, e, slot = starts[b], starts[b + 1], slots[b]
        if slot < 0 or e == s:
            continue
        if init[b]:
            state = conv_states[slot].to(acc)
        else:
            state = torch.zeros(d, w - 1, dtype=acc, device=x.device)
        xx = torch.cat([state, x[s:e].t().to(acc)], dim=1)                 # [D, W-1+L]
        y = F.conv1d(xx[None], weight.to(acc)[:, None, :],
                     None if bias is None else bias.to(acc), groups=d)[0]   # [D, L]
        out[s:e] = _conv_act(y, activation).t().to(x.dtype)
        conv_states[slot] = xx[:, xx.shape[1] - (w - 1):].to(conv_states.dtype)
    return out


def causal_conv1d_update(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, state_indices: torch.Tensor,
                         activation: str | None = "silu") -> torch.Tensor:
    # x: [B, D] one token per sequence, conv_states: [S, D, W-1] -> out [B, D]; the slot shifts
    # left by one column and takes x as its newest column.
    check_causal_conv1d_args(x, weight, bias, conv_states, activation, "causal_conv1d_update")
    _check_ssm_batch("causal_conv1d_update", conv_states.shape[0], None, state_indices, None,
                     x.shape[0])
    acc = _ssm_acc_dtype(x, weight)
    out = torch.zeros_like(x)
    for b, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        xx = torch.cat([conv_states[slot].to(acc), x[b, :, None].to(acc)], dim=1)   # [D, W]
        y = (xx * weight.to(acc)).sum(1)
        if bias is not None:
            y = y + bias.to(acc)
        out[b] = _conv_act(y, activation).to(x.dtype)
        conv_states[slot] = xx[:, 1:].to(conv_states.dtype)
    return out


def check_selective_scan_args(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor, C: torch.Tensor, D_skip: torch.Tensor | None,
                              z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                              ssm_states: torch.Tensor, op: str = "selective_scan") -> None:
    """Raises ValueError (saying what to change) on inconsistent selective-scan shapes."""
    if u.dim() != 2 or A.dim() != 2:
        raise ValueError(f"{op}: u must be [T, D] and A [D, N], got {tuple(u.shape)}, "
                         f"{tuple(A.shape)}")
    t, d = u.shape
    n = A.shape[1]
    if A.shape[0] != d:
        raise ValueError(f"{op}: A must be [D={d}, N], got {tuple(A.shape)}")
    for name, ten in (("delta", delta), ("z", z)):
        if ten is not None and tuple(ten.shape) != (t, d):
            raise ValueError(f"{op}: {name} must be [{t}, {d}] like u, got {tuple(ten.shape)}")
    for name, ten in (("B", B), ("C", C)):
        if tuple(ten.shape) != (t, n):
            raise ValueError(f"{op}: {name} must be [T={t}, N={n}], got {tuple(ten.shape)}")
    for name, ten in (("D_skip", D_skip), ("delta_bias", delta_bias)):
        if ten is not None and tuple(ten.shape) != (d,):
            raise ValueError(f"{op}: {name} must be [{d}], got {tuple(ten.shape)}")
    if ssm_states.dim() != 3 or tuple(ssm_states.shape[1:]) != (d, n):
        raise ValueError(f"{op}: ssm_states must be [S, {d}, {n}], got {tuple(ssm_states.shape)}")


def _scan_sequence(h: torch.Tensor, u, dt, A, B, C, chunk: int = 64):
    # h [D, N] (updated), u/dt [L, D], B/C [L, N], all in the accumulation dtype -> y [L, D]
    ys = []
    for c0 in range(0, u.shape[0], chunk):   # chunks bound the [L, D, N] temporaries
        dA = torch.exp(dt[c0:c0 + chunk, :, None] * A)                      # [l, D, N]
        dBu = (dt[c0:c0 + chunk] * u[c0:c0 + chunk])[:, :, None] * B[c0:c0 + chunk, None, :]
        for i in range(dA.shape[0]):
            h = dA[i] * h + dBu[i]
            ys.append(h @ C[c0 + i])
    return h, torch.stack(ys) if ys else u.new_zeros(0, u.shape[1])


def _ssm_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool, acc) -> torch.Tensor:
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    return F.softplus(dt) if softplus else dt


def _ssm_output(y: torch.Tensor, u: torch.Tensor, D_skip, z, acc) -> torch.Tensor:
    if D_skip is not None:
        y = y + u * D_skip.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D_skip: torch.Tensor | None, z: torch.Tensor | None,
                   delta_bias: torch.Tensor | None, delta_softplus: bool,
                   ssm_states: torch.Tensor, query_start_loc: torch.Tensor,
                   state_indices: torch.Tensor,
                   has_initial_state: torch.Tensor | None = None) -> torch.Tensor:
    # u, delta, z: [T, D]; A: [D, N] fp32; B, C: [T, N]; D_skip, delta_bias: [D];
    # ssm_states: [S, D, N] -> out [T, D] in u's dtype.
    # dt = softplus(delta + delta_bias) (or without softplus); h = exp(dt A) h + dt B[t] u[t];
    # y = h C[t] + D_skip u; out = y * silu(z). State math in fp32 whatever ssm_states holds.
    check_selective_scan_args(u, delta, A, B, C, D_skip, z, delta_bias, ssm_states)
    nseq = state_indices.shape[0]
    _check_ssm_batch("selective_scan", ssm_states.shape[0], query_start_loc, state_indices,
                     has_initial_state, nseq, u.shape[0])
    acc = _ssm_acc_dtype(u, ssm_states)
    d, n = A.shape
    out = torch.zeros_like(u)
    starts = query_start_loc.tolist()
    slots = state_indices.tolist()
    init = [True] * nseq if has_initial_state is None else has_initial_state.tolist()
    Af = A.to(acc)
    for b in range(nseq):
        s, e, slot = starts[b], starts[b + 1], slots[b]
        if slot < 0 or e == s:
            continue
        h = ssm_states[slot].to(acc) if init[b] else torch.zeros(d, n, dtype=acc, device=u.device)
        ub = u[s:e].to(acc)
        dt = _ssm_dt(delta[s:e], delta_bias, delta_softplus, acc)
        h, y = _scan_sequence(h, ub, dt, Af, B[s:e].to(acc), C[s:e].to(acc))
        y = _ssm_output(y, ub, D_skip, None if z is None else z[s:e], acc)
        out[s:e] = y.to(u.dtype)
        ssm_states[slot] = h.to(ssm_states.dtype)
    return out


def selective_state_update(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                           A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D_skip: torch.Tensor | None, z: torch.Tensor | None,
                           dt_bias: torch.Tensor | None, dt_softplus: bool,
                           state_indices: torch.Tensor) -> torch.Tensor:
    # One decode step of selective_scan: x, dt, z: [B, D]; B, C: [B, N]; ssm_states [S, D, N]
    # (slot state_indices[b] read and written in place) -> out [B, D]
    check_selective_scan_args(x, dt, A, B, C, D_skip, z, dt_bias, ssm_states,
                              "selective_state_update")
    _check_ssm_batch("selective_state_update", ssm_states.shape[0], None, state_indices, None,
                     x.shape[0])
    acc = _ssm_acc_dtype(x, ssm_states)
    out = torch.zeros_like(x)
    slots = state_indices.to(torch.long)
    live = (slots >= 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    sl = slots[live]
    h = ssm_states[sl].to(acc)                                               # [b, D, N]
    xf = x[live].to(acc)
    dtf = _ssm_dt(dt[live], dt_bias, dt_softplus, acc)
    h = torch.exp(dtf[:, :, None] * A.to(acc)) * h \
        + (dtf * xf)[:, :, None] * B[live].to(acc)[:, None, :]
    y = (h @ C[live].to(acc)[:, :, None])[:, :, 0]
    y = _ssm_output(y, xf, D_skip, None if z is None else z[live], acc)
    out[live] = y.to(x.dtype)
    ssm_states[sl] = h.to(ssm_states.dtype)
    return out


# ---- Mamba-2 SSD (state-space duality): prefill scan and decode update ---------------------------
# Heads H of dim P, state size N, groups G (head h reads B/C of group h // (H // G)). Per token:
#   dt' = clamp(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias, *dt_limit)
#   h = exp(dt' * A) * h + dt' * outer(x[t], B[t])  (h [H, P, N], fp32);  y = h @ C[t] + D_skip * x
# Flat varlen batches: sequence b owns rows query_start_loc[b]:query_start_loc[b+1] and the state
# slot state_indices[b] (read when has_initial_state[b], else zeros; the final state is written
# back in place). A negative state index marks a padding row: output zeros, no slot touched.
# These references are the plain recurrence; the kernels use the chunked SSD form.

def check_ssd_args(name: str, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor, C: torch.Tensor, D_skip: torch.Tensor | None,
                   dt_bias: torch.Tensor | None, ssm_states: torch.Tensor | None,
                   state_indices: torch.Tensor | None, dt_limit) -> tuple[int, int, int, int]:
    # -> (H, P, G, N); ValueError naming what to change
    if ssm_states is None or state_indices is None:
        raise ValueError(f"{name}: ssm_states and state_indices are required")
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    t, h, p = x.shape
    if B.dim() != 3 or C.shape != B.shape or B.shape[0] != t:
        raise ValueError(f"{name}: B and C must both be [{t}, groups, state], got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[1], B.shape[2]
    if g == 0 or h % g:
        raise ValueError(f"{name}: heads ({h}) must be a multiple of groups ({g})")
    if dt.shape != (t, h):
        raise ValueError(f"{name}: dt must be [{t}, {h}], got {tuple(dt.shape)}")
    for what, v in (("A", A), ("D_skip", D_skip), ("dt_bias", dt_bias)):
        if v is not None and v.shape != (h,):
            raise ValueError(f"{name}: {what} must be [{h}], got {tuple(v.shape)}")
    if ssm_states.dim() != 4 or tuple(ssm_states.shape[1:]) != (h, p, n):
        raise ValueError(f"{name}: ssm_states must be [slots, {h}, {p}, {n}], got "
                         f"{tuple(ssm_states.shape)}")
    if state_indices.dim() != 1 or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: state_indices must be a 1-D int32 tensor")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{name}: dt_limit must be (low, high) with low <= high, got {dt_limit}")
    return h, p, g, n


def ssd_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
           dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    # dt [..., H] -> the discretization step dt' in the accumulation dtype
    d = _acc(dt)
    if dt_bias is not None:
        d = d + dt_bias.to(d.dtype)
    if dt_softplus:
        d = F.softplus(d)
    return d.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))


def _ssd_step(h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
              Bh: torch.Tensor, Ch: torch.Tensor) -> torch.Tensor:
    # h [H, P, N] updated in place; x [H, P], dt [H], A [H], Bh/Ch [H, N] -> y [H, P] (no D)
    h.mul_(torch.exp(dt * A)[:, None, None]).add_((dt[:, None] * x)[:, :, None] * Bh[:, None, :])
    return torch.einsum("hpn,hn->hp", h, Ch)


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, chunk_size: int, D_skip: torch.Tensor | None = None,
                   dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                   dt_limit=(0.0, float("inf")), ssm_states: torch.Tensor | None = None,
                   query_start_loc: torch.Tensor | None = None,
                   state_indices: torch.Tensor | None = None,
                   has_initial_state: torch.Tensor | None = None) -> torch.Tensor:
    # x [T, H, P], dt [T, H], A [H], B/C [T, G, N], ssm_states [S, H, P, N] (in place) -> [T, H, P]
    h_, p, g, n = check_ssd_args("ssd_chunk_scan", x, dt, A, B, C, D_skip, dt_bias, ssm_states,
                                 state_indices, dt_limit)
    if chunk_size <= 0:
        raise ValueError(f"ssd_chunk_scan: chunk_size must be positive, got {chunk_size}")
    if query_start_loc is None or query_start_loc.shape != (state_indices.shape[0] + 1,):
        raise ValueError("ssd_chunk_scan: query_start_loc must be [num_seqs + 1]")
    acc = _acc(x).dtype
    d = ssd_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = A.to(acc)
    rep = h_ // g
    bh, ch = (v.to(acc).repeat_interleave(rep, dim=1) for v in (B, C))   # [T, H, N]
    xa = x.to(acc)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    starts = query_start_loc.tolist()
    init = [True] * len(state_indices) if has_initial_state is None else has_initial_state.tolist()
    for b, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        st = ssm_states[slot].to(acc) if init[b] else torch.zeros(h_, p, n, dtype=acc, device=x.device)
        for t in range(starts[b], starts[b + 1]):
            out[t] = _ssd_step(st, xa[t], d[t], a, bh[t], ch[t])
            if D_skip is not None:
                out[t] += D_skip.to(acc)[:, None] * xa[t]
        ssm_states[slot] = st.to(ssm_states.dtype)
    return out.to(x.dtype)


def ssd_state_update(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D_skip: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                     dt_softplus: bool = False, dt_limit=(0.0, float("inf")),
                     state_indices: torch.Tensor | None = None) -> torch.Tensor:
    # one token per sequence: x [B, H, P], dt [B, H], B/C [B, G, N] -> out [B, H, P]
    if state_indices is None:
        raise ValueError("ssd_state_update: state_indices is required")
    qsl = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    return ssd_chunk_scan(x, dt, A, B, C, 1, D_skip, dt_bias, dt_softplus, dt_limit, ssm_states,
                          qsl, state_indices, None)


# ---- FP8 (E4M3) weight GEMM ------------------------------------------------------------------
# A weight is e4m3 codes [N, K] (torch.float8_e4m3fn, or their bytes as uint8) and fp32 scales
# over blocks of block_n x block_k: W[n, k] = fp8(q[n, k]) * scale[n // block_n, k // block_k].
# Per-tensor is one block of N x K, per-channel blocks of 1 x K, DeepSeek-V3 blocks of 128 x 128.
# Activations stay in their dtype (W8A16) or are quantized to e4m3 themselves (W8A8): per token
# with scale amax / 448 ("dynamic"), or with one given scale (a checkpoint's static input_scale).

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_codes(weight: torch.Tensor) -> torch.Tensor:
    """The e4m3 bytes of a weight given as float8_e4m3fn or uint8 (same storage)."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.view(torch.uint8)
    if weight.dtype != torch.uint8:
        raise ValueError(f"fp8 weight must be float8_e4m3fn (or its bytes as uint8), got {weight.dtype}")
    return weight


def fp8_scale_blocks(weight_scale: torch.Tensor, n: int, k: int,
                     block_size: tuple[int, int] | list[int] | None = None
                     ) -> tuple[torch.Tensor, int, int]:
    """Any supported scale -> (fp32 [ceil(N/bn), ceil(K/bk)], bn, bk): a single value is
    per-tensor, [N] or [N, 1] per-channel, block_size=(bn, bk) a block grid (e.g. 128 x 128)."""
    s = weight_scale.float()
    if block_size is not None:
        bn, bk = (int(b) for b in block_size)
        if bn <= 0 or bk <= 0:
            raise ValueError(f"fp8 block_size must be positive, got {tuple(block_size)}")
        grid = (-(-n // bn), -(-k // bk))
        if tuple(s.shape) != grid:
            raise ValueError(f"fp8 block scales for a [{n}, {k}] weight in {bn} x {bk} blocks must "
                             f"be {list(grid)}, got {list(s.shape)}")
        return s.contiguous(), bn, bk
    if s.numel() == 1:
        return s.reshape(1, 1).contiguous(), max(n, 1), max(k, 1)
    if tuple(s.shape) in ((n,), (n, 1)):
        return s.reshape(n, 1).contiguous(), 1, max(k, 1)
    raise ValueError(f"fp8 weight scale of shape {list(s.shape)} fits neither per-tensor ([] or "
                     f"[1]) nor per-channel ([{n}] or [{n}, 1]) for a [{n}, {k}] weight; block "
                     "scales need block_size")


def fp8_dequantize(weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_size: tuple[int, int] | list[int] | None = None) -> torch.Tensor:
    """e4m3 weight [N, K] and its scales -> the fp32 weight [N, K]."""
    q = fp8_codes(weight).view(torch.float8_e4m3fn).float()
    n, k = q.shape
    s, bn, bk = fp8_scale_blocks(weight_scale, n, k, block_size)
    rows = torch.arange(n, device=q.device) // bn
    cols = torch.arange(k, device=q.device) // bk
    return q * s.to(q.device)[rows][:, cols]


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating at +-448); scale broadcasts against x."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_quantize_act(x: torch.Tensor, input_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (e4m3 [M, K], fp32 scales [M]): per token amax / 448 (dynamic),
    or the one static `input_scale` for every token."""
    if input_scale is None:
        scale = (x.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    else:
        scale = input_scale.float().reshape(1).to(x.device).expand(x.shape[0]).contiguous()
    return fp8_quantize(x, scale[:, None]), scale


def fp8_quantize_weight(w: torch.Tensor, block_size: tuple[int, int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (e4m3 [N, K], fp32 scales): per output channel ([N, 1], amax /
    448, as vLLM's dynamic fp8) or per block ([ceil(N/bn), ceil(K/bk)])."""
    n, k = w.shape
    wf = w.float()
    if block_size is None:
        scale = (wf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return fp8_quantize(wf, scale), scale
    bn, bk = block_size
    gn, gk = -(-n // bn), -(-k // bk)
    padded = F.pad(wf.abs(), (0, gk * bk - k, 0, gn * bn - n))
    scale = (padded.view(gn, bn, gk, bk).amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return fp8_quantize(wf, full), scale


def fp8_activations(x: torch.Tensor, act_scale) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x as the GEMM reads it, per-row fp32 scales or None): act_scale None keeps x (W8A16),
    "dynamic" quantizes per token, a tensor is a static per-tensor input scale (W8A8)."""
    if act_scale is None:
        return x, None
    if isinstance(act_scale, str):
        if act_scale != "dynamic":
            raise ValueError(f"fp8 act_scale must be None, 'dynamic' or a scale tensor, got {act_scale!r}")
        return fp8_quantize_act(x)
    return fp8_quantize_act(x, act_scale)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             block_size: tuple[int, int] | list[int] | None = None,
             bias: torch.Tensor | None = None, act_scale=None) -> torch.Tensor:
    # x: [..., K] -> [..., N] in x's dtype: dequantize (weight and, W8A8, x), then matmul in
    # fp32 (fp64 for fp64 x)
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = fp8_activations(x2, act_scale)
    acc = _acc(x).dtype
    xa = xq.float().to(acc) * xs.to(acc)[:, None] if xs is not None else _acc(x2)
    w = fp8_dequantize(weight, weight_scale, block_size).to(acc)
    y = F.linear(xa, w, None if bias is None else bias.to(acc))
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


# FP8 fused MoE: expert weights w13 [E, 2I, H] and w2 [E, H, I] in e4m3 with per-expert scales in
# any form fp8_scale_blocks takes, stacked over experts: per tensor [E] (or [E, 1]), per channel
# [E, N] (or [E, N, 1]), or blocks [E, ceil(N/bn), ceil(K/bk)] with block_size (bn, bk).

def fp8_moe_row_scales(scale: torch.Tensor, n: int, k: int,
                       block_size: tuple[int, int] | list[int] | None = None
                       ) -> tuple[torch.Tensor, int]:
    """Per-expert scales -> (fp32 [E, N, ceil(K/bk)] with one row per output, bk): the form the
    CPU kernel reads (a block's scale repeated over its bn rows)."""
    rows = []
    bk = max(k, 1)
    for x in range(scale.shape[0]):
        s, bn, bk = fp8_scale_blocks(scale[x], n, k, block_size)
        rows.append(s.repeat_interleave(bn, 0)[:n])
    if not rows:
        return scale.new_zeros(0, n, 1, dtype=torch.float32), bk
    return torch.stack(rows).contiguous(), bk


def fused_moe_fp8(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu",
                  block_size: tuple[int, int] | list[int] | None = None) -> torch.Tensor:
    # fused_moe with e4m3 experts: each chosen expert dequantized (fp8_dequantize), then the same
    # gated MLP in fp32 -> out [T, H] in hidden's dtype
    check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, activation)
    n13, h = w13.shape[1:]
    if w13_scale.shape[0] != w13.shape[0] or w2_scale.shape[0] != w2.shape[0]:
        raise ValueError(f"fused_moe_fp8: scales must have one entry per expert ({w13.shape[0]}), "
                         f"got {list(w13_scale.shape)} and {list(w2_scale.shape)}")

    def expert(ex: int):
        return (fp8_dequantize(w13[ex], w13_scale[ex], block_size),
                fp8_dequantize(w2[ex], w2_scale[ex], block_size))
    return _fused_moe_experts(hidden, expert, w13.shape[0], n13 // 2, topk_weights, topk_ids,
                              activation)


def prepare_moe_fp8_weights(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                            w2_scale: torch.Tensor, block_size=None):
    """The fp8 expert weights in the form fused_moe_fp8_prepared takes (here: unchanged)."""
    return (w13, w2, w13_scale, w2_scale, block_size)


def fused_moe_fp8_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    w13, w2, w13_scale, w2_scale, block_size = prepared
    return fused_moe_fp8(hidden, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation,
                         block_size)


def unpack_moe_fp8_scales(w13_scale: torch.Tensor, w2_scale: torch.Tensor, hidden_size: int,
                          inter_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_moe_fp8_scales: ([E, 2I, Kb13], [E, H, Kb2])."""
    def unpack(p, n):  # [E, N/64, Kb, 64] -> [E, n, Kb]
        return p.permute(0, 1, 3, 2).reshape(p.shape[0], -1, p.shape[2])[:, :n]
    return (torch.cat((unpack(w13_scale[:, :, 0], inter_size), unpack(w13_scale[:, :, 1], inter_size)), 1),
            unpack(w2_scale, hidden_size))


def pack_moe_fp8_scales(w13_scale: torch.Tensor, w2_scale: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scales ([E, 2I, Kb13], [E, H, Kb2], fp8_moe_row_scales) in the CPU kernel's panels:
    [E, ceil(I/64), 2 (gate, up), Kb13, 64] and [E, ceil(H/64), Kb2, 64] (padding rows 0)."""
    def panels(s):  # [E, N, Kb] -> [E, ceil(N/64), Kb, 64]
        e, n, kb = s.shape
        s = F.pad(s.float(), (0, 0, 0, -n % PANEL))
        return s.view(e, -1, PANEL, kb).permute(0, 1, 3, 2).contiguous()
    i = w13_scale.shape[1] // 2
    return (torch.stack((panels(w13_scale[:, :i]), panels(w13_scale[:, i:])), dim=2),
            panels(w2_scale))
# ---- end FP8 ----


# ---- INT8 GEMM (W8A8 and weight-only W8A16) ---------------------------------------------------
# W8A8: weight codes wq [N, K] int8 with per-channel scales sw [N] (W = wq * sw). Activations are
# quantized per token from their fp32 value: symmetric xq = round(x * 127/amax) (scale amax/127),
# or asymmetric (compressed-tensors' asymmetric input_activations) over [min(x, 0), max(x, 0)]:
# xq = round(x * 255/range) + azp with azp = round(-128 - min * 255/range) (scale range/255);
# a static per-tensor input_scale (and input_zero_point) replaces the dynamic ones. Clamped to
# [-128, 127]; a row of zeros gets scale 1. Then, exactly in integers:
#   out[m, n] = sx[m] * sw[n] * (sum_k xq[m, k] wq[n, k] - azp[m] * sum_k wq[n, k]) + bias[n]
# W8A16 (weight-only): W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size, q
# int8 (GPTQ 8-bit, GGUF Q8_0 / Q5_K / Q6_K).

INT8_PANEL = 16  # outputs per panel of both packed INT8 layouts


def _full(t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(t, value)


def int8_quantize_per_token(x: torch.Tensor, asymmetric: bool = False,
                            input_scale: torch.Tensor | None = None,
                            input_zero_point: torch.Tensor | None = None):
    """x [M, K] -> (xq int8 [M, K], scale float32 [M], azp int32 [M]), fp32 arithmetic."""
    xf = x.float()
    m = xf.shape[0]
    # tensor / tensor divisions: torch turns `scalar / t` and `t / scalar` into products with a
    # reciprocal, whose rounding is not the kernel's (and moves rows onto other int8 steps)
    if input_scale is not None:
        s = input_scale.float().reshape(1).to(xf.device).expand(m).contiguous()
        inv = _full(s, 1.0) / s
        zp = (input_zero_point.float().reshape(1).to(xf.device).expand(m)
              if input_zero_point is not None else torch.zeros(m, device=xf.device))
    elif asymmetric:
        lo = xf.amin(1).clamp(max=0) if xf.shape[1] else torch.zeros(m, device=xf.device)
        hi = xf.amax(1).clamp(min=0) if xf.shape[1] else torch.zeros(m, device=xf.device)
        rng = hi - lo
        inv = torch.where(rng > 0, _full(rng, 255.0) / rng, torch.zeros_like(rng))
        s = torch.where(rng > 0, rng / _full(rng, 255.0), torch.ones_like(rng))
        zp = torch.round(-128.0 - lo * inv).clamp(-128, 127)
    else:
        amax = xf.abs().amax(1) if xf.shape[1] else torch.zeros(m, device=xf.device)
        inv = torch.where(amax > 0, _full(amax, 127.0) / amax, torch.zeros_like(amax))
        s = torch.where(amax > 0, amax / _full(amax, 127.0), torch.ones_like(amax))
        zp = torch.zeros(m, device=xf.device)
    q = (torch.round(xf * inv[:, None]) + zp[:, None]).clamp(-128, 127)
    return q.to(torch.int8), s.contiguous(), zp.to(torch.int32)


def int8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, azp: torch.Tensor | None,
                   wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer product (exact: float64 holds every int32 sum) scaled in fp32 (fp64 for an
    fp64 out_dtype) -> [M, N] out_dtype."""
    acc = xq.double() @ wq.double().t()
    if azp is not None:
        acc = acc - azp.double()[:, None] * wq.double().sum(1)[None, :]
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    out = acc.to(ct) * (x_scale.to(ct)[:, None] * w_scale.reshape(-1).to(ct)[None, :])
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(out_dtype)


def int8_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, asymmetric: bool = False,
              input_scale: torch.Tensor | None = None,
              input_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] -> [M, N]: quantize x per token, integer matmul, scale
    xq, sx, azp = int8_quantize_per_token(x, asymmetric, input_scale, input_zero_point)
    return int8_scaled_mm(xq, sx, azp, wq, w_scale, bias, x.dtype)


def pack_int8_panels(wq: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int8 [ceil(N/16), ceil(K/2), 16, 2]: element [p, kk, j, i] is output
    16p+j at k = 2kk+i (zero padded)."""
    n, k = wq.shape
    w = F.pad(wq.to(torch.int8), (0, k % 2, 0, -n % INT8_PANEL))
    p, k2 = w.shape[0] // INT8_PANEL, w.shape[1] // 2
    return w.view(p, INT8_PANEL, k2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_int8_panels(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    p, k2 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(p * INT8_PANEL, 2 * k2)[:n, :k]


def int8_prepare(wq: torch.Tensor, w_scale: torch.Tensor):
    """Repack W8A8 weights [N, K] (scales [N] or [N, 1]) once for int8_gemm_prepared."""
    from octavo.ops import Int8Weight
    n, k = wq.shape
    if wq.dtype != torch.int8:
        raise ValueError(f"int8_prepare: weight codes must be int8, got {wq.dtype}")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"int8_prepare: weight scales must be per channel [{n}] or per tensor "
                         f"[1], got {tuple(w_scale.shape)}")
    scale = w_scale.float().reshape(-1).expand(n).contiguous()
    colsum = wq.to(torch.int32).sum(1).to(torch.int32)
    return Int8Weight(pack_int8_panels(wq), scale, colsum, n, k)


def int8_gemm_prepared(x: torch.Tensor, w, bias: torch.Tensor | None = None,
                       asymmetric: bool = False, input_scale: torch.Tensor | None = None,
                       input_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: int8_prepare(...)
    x2 = x.reshape(-1, x.shape[-1])
    wq = unpack_int8_panels(w.packed, w.n, w.k)
    out = int8_gemm(x2, wq, w.scales, bias, asymmetric, input_scale, input_zero_point)
    return out.view(*x.shape[:-1], w.n)


def int8_woq_dequantize(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                        group_size: int) -> torch.Tensor:
    """codes [N, K] int8, scales / offsets [N, G] -> the fp32 weight [N, K]."""
    n, k = q.shape
    gs, _ = int4_groups(k, group_size)
    g = torch.arange(k, device=q.device) // gs
    w = q.float() * scales.float()[:, g]
    return w if offsets is None else w + offsets.float()[:, g]


def int8_woq_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                  offsets: torch.Tensor | None = None, group_size: int = -1,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] -> [M, N]: dequantize, then matmul (in fp32, fp64 for fp64 x)
    w = int8_woq_dequantize(q, scales, offsets, group_size)
    return linear(x, w.to(_acc(x).dtype), bias)


def pack_int8_woq_panels(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                         group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] -> int8 [ceil(N/16), K, 16] (element [p, k, j]: output 16p+j);
    scales / offsets [N, G] -> float32 [ceil(N/16), G, 2, 16]. Zero padded."""
    n, k = q.shape
    _, groups = int4_groups(k, group_size)
    n_pad = -n % INT8_PANEL
    w = F.pad(q.to(torch.int8), (0, 0, 0, n_pad))
    p = w.shape[0] // INT8_PANEL
    packed = w.view(p, INT8_PANEL, k).permute(0, 2, 1).contiguous()
    off = torch.zeros_like(scales, dtype=torch.float32) if offsets is None else offsets.float()
    so = torch.stack((scales.float(), off), dim=1)                 # [N, 2, G]
    so = F.pad(so, (0, 0, 0, 0, 0, n_pad)).view(p, INT8_PANEL, 2, groups).permute(0, 3, 2, 1)
    return packed, so.contiguous()


def unpack_int8_woq_panels(packed: torch.Tensor, scales_offsets: torch.Tensor, n: int,
                           group_size: int) -> torch.Tensor:
    """The fp32 weight [n, K] that pack_int8_woq_panels' output stands for."""
    p, k, _ = packed.shape
    q = packed.permute(0, 2, 1).reshape(p * INT8_PANEL, k)[:n]
    so = scales_offsets.permute(0, 3, 2, 1).reshape(p * INT8_PANEL, 2, -1)[:n]
    return int8_woq_dequantize(q, so[:, 0], so[:, 1], group_size)


def int8_woq_prepare(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                     group_size: int):
    """Repack a weight-only int8 weight once for int8_woq_gemm_prepared (ops.Int8WoqWeight)."""
    from octavo.ops import Int8WoqWeight
    n, k = q.shape
    gs, groups = int4_groups(k, group_size)
    if q.dtype != torch.int8:
        raise ValueError(f"int8_woq_prepare: codes must be int8, got {q.dtype}")
    if scales.shape != (n, groups) or (offsets is not None and offsets.shape != (n, groups)):
        raise ValueError(f"int8_woq_prepare: scales / offsets must be [{n}, {groups}], got "
                         f"{tuple(scales.shape)} / "
                         f"{None if offsets is None else tuple(offsets.shape)}")
    packed, so = pack_int8_woq_panels(q, scales, offsets, gs)
    return Int8WoqWeight(packed, so, n, k, gs)


def int8_woq_gemm_prepared(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K] -> [..., N]; w: int8_woq_prepare(...)
    x2 = x.reshape(-1, x.shape[-1])
    wt = unpack_int8_woq_panels(w.packed, w.scales_offsets, w.n, w.group_size)
    return linear(x2, wt.to(_acc(x2).dtype), bias).view(*x.shape[:-1], w.n)
# ---- end INT8 GEMM ----


# ---- INT8 MoE: fused MoE over weight-only int8 experts ------------------------------------------
# Expert weights W[n, k] = q[n, k] * scale[n, g] + offset[n, g] with q int8 and g = k // group
# size: GGUF Q8_0 / Q5_K / Q6_K expert stacks, and the 4-bit stacks of a layer that mixes them
# (Q4_K_M keeps gate / up in Q4_K and down in Q6_K). w13 [E, 2I, H] and w2 [E, H, I] each have a
# group size of their own. Packed once per expert in the dense weight-only int8 layout
# (pack_int8_woq_panels), gate and up rows padded separately so that a panel never mixes them:
#   w13: int8 [E, 2 * ceil(I/16), H, 16] (gate panels, then up panels), w2: [E, ceil(H/16), I, 16]
#   scales / offsets: float32 [E, panels, G, 2, 16].

def _moe_int8_stack(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group_size: int, name: str) -> None:
    if q.dim() != 3 or q.dtype != torch.int8:
        raise ValueError(f"INT8 MoE experts: {name} codes must be int8 [E, N, K], got {q.dtype} "
                         f"{tuple(q.shape)}")
    e, n, k = q.shape
    _, groups = int4_groups(k, group_size)
    for what, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != (e, n, groups):
            raise ValueError(f"INT8 MoE experts: {name} {what} must be [{e}, {n}, {groups}] "
                             f"(groups of {group_size} over K = {k}), got {tuple(t.shape)}")


def _moe_int8_shapes(w13_q, w13_scales, w13_offsets, w2_q, w2_scales, w2_offsets, gs13, gs2):
    _moe_int8_stack(w13_q, w13_scales, w13_offsets, gs13, "w13")
    _moe_int8_stack(w2_q, w2_scales, w2_offsets, gs2, "w2")
    e, i2, h = w13_q.shape
    if i2 % 2 or tuple(w2_q.shape) != (e, h, i2 // 2):
        raise ValueError(f"INT8 MoE experts: w13 must be [E, 2I, H] and w2 [E, H, I], got "
                         f"{tuple(w13_q.shape)} and {tuple(w2_q.shape)}")


def moe_int8_dequantize(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                        group_size: int) -> torch.Tensor:
    """One expert's (or a stack's) codes [..., N, K] -> the fp32 weight [..., N, K]."""
    k = q.shape[-1]
    gs, _ = int4_groups(k, group_size)
    g = torch.arange(k, device=q.device) // gs
    w = q.float() * scales.float()[..., g]
    return w if offsets is None else w + offsets.float()[..., g]


def fused_moe_int8(hidden: torch.Tensor, w13_q: torch.Tensor, w13_scales: torch.Tensor,
                   w13_offsets: torch.Tensor | None, w2_q: torch.Tensor, w2_scales: torch.Tensor,
                   w2_offsets: torch.Tensor | None, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, group_size13: int, group_size2: int,
                   activation: str = "silu") -> torch.Tensor:
    # fused_moe with int8 experts: each chosen expert dequantized, then the same gated MLP in
    # fp32 (fp64 for fp64 hidden) -> out [T, H] in hidden's dtype
    _moe_int8_shapes(w13_q, w13_scales, w13_offsets, w2_q, w2_scales, w2_offsets, group_size13,
                     group_size2)
    check_fused_moe_args(hidden, w13_q, w2_q, topk_weights, topk_ids, activation)

    def expert(ex: int):
        return (moe_int8_dequantize(w13_q[ex], w13_scales[ex],
                                    None if w13_offsets is None else w13_offsets[ex], group_size13),
                moe_int8_dequantize(w2_q[ex], w2_scales[ex],
                                    None if w2_offsets is None else w2_offsets[ex], group_size2))
    return _fused_moe_experts(hidden, expert, w13_q.shape[0], w13_q.shape[1] // 2, topk_weights,
                              topk_ids, activation)


def _pack_int8_experts(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # [E, N, K] -> (int8 [E, ceil(N/16), K, 16], float32 [E, ceil(N/16), G, 2, 16])
    e, n, k = q.shape
    gs, groups = int4_groups(k, group_size)
    if e == 0:
        p = -(-n // INT8_PANEL)
        return (q.new_zeros(0, p, k, INT8_PANEL, dtype=torch.int8),
                q.new_zeros(0, p, groups, 2, INT8_PANEL, dtype=torch.float32))
    parts = [pack_int8_woq_panels(q[x], scales[x], None if offsets is None else offsets[x], gs)
             for x in range(e)]
    return torch.stack([a for a, _ in parts]), torch.stack([b for _, b in parts])


def prepare_moe_int8_weights(w13_q: torch.Tensor, w13_scales: torch.Tensor,
                             w13_offsets: torch.Tensor | None, w2_q: torch.Tensor,
                             w2_scales: torch.Tensor, w2_offsets: torch.Tensor | None,
                             group_size13: int, group_size2: int | None = None):
    """Pack int8 experts once after loading (layout above) -> ops.MoEInt8Weights; group_size2
    defaults to group_size13 (-1: one group per output channel)."""
    from octavo.ops import MoEInt8Weights
    gs2 = group_size13 if group_size2 is None else group_size2
    _moe_int8_shapes(w13_q, w13_scales, w13_offsets, w2_q, w2_scales, w2_offsets, group_size13, gs2)
    i, h = w13_q.shape[1] // 2, w13_q.shape[2]
    gate = _pack_int8_experts(w13_q[:, :i], w13_scales[:, :i],
                              None if w13_offsets is None else w13_offsets[:, :i], group_size13)
    up = _pack_int8_experts(w13_q[:, i:], w13_scales[:, i:],
                            None if w13_offsets is None else w13_offsets[:, i:], group_size13)
    w2p, w2so = _pack_int8_experts(w2_q, w2_scales, w2_offsets, gs2)
    return MoEInt8Weights(torch.cat((gate[0], up[0]), 1).contiguous(),
                          torch.cat((gate[1], up[1]), 1).contiguous(), w2p, w2so, h, i,
                          int4_groups(h, group_size13)[0], int4_groups(i, gs2)[0])


def unpack_moe_int8_weights(prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 experts (w13 [E, 2I, H], w2 [E, H, I]) that an ops.MoEInt8Weights stands for."""
    p = prepared
    h, i = p.hidden_size, p.inter_size
    pi = -(-i // INT8_PANEL)

    def unpack(packed, so, n, k, gs):
        if packed.shape[0] == 0:
            return packed.new_zeros(0, n, k, dtype=torch.float32)
        return torch.stack([unpack_int8_woq_panels(packed[x], so[x], n, gs)
                            for x in range(packed.shape[0])])
    gate = unpack(p.w13[:, :pi], p.w13_scales_offsets[:, :pi], i, h, p.group_size13)
    up = unpack(p.w13[:, pi:], p.w13_scales_offsets[:, pi:], i, h, p.group_size13)
    return torch.cat((gate, up), 1), unpack(p.w2, p.w2_scales_offsets, h, i, p.group_size2)


def fused_moe_int8_prepared(hidden: torch.Tensor, prepared, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    # prepared: prepare_moe_int8_weights(...) -> out [T, H]
    w13, w2 = unpack_moe_int8_weights(prepared)
    return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
# ---- end INT8 MoE ----


# ---- Gated delta rule (Kimi-Linear's KDA; Qwen3-Next's GDN when g has one value per head) -------
# Heads H, key dim K, value dim V; state S [H, K, V] fp32 per slot. Per token (q, k l2-normalized
# when use_qk_l2norm, q scaled by `scale`, default K ** -0.5):
#   S = exp(g[t])[:, :, None] * S          (g [H, K] log-decays <= 0, or [H] for one per head)
#   S = S + k outer ((v - k^T S) * beta)   (beta [H]);   o = q^T S   [H, V]
# Same flat varlen batches, state slots, has_initial_state and negative-index padding as the SSD ops.

def check_gdr_args(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   g: torch.Tensor, beta: torch.Tensor, ssm_states: torch.Tensor | None,
                   state_indices: torch.Tensor | None) -> tuple[int, int, int, int]:
    # -> (T, H, K, V); ValueError naming what to change
    if ssm_states is None or state_indices is None:
        raise ValueError(f"{name}: ssm_states and state_indices are required")
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"{name}: q and k must both be [tokens, heads, key_dim], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    t, h, kd = q.shape
    if v.dim() != 3 or v.shape[:2] != (t, h):
        raise ValueError(f"{name}: v must be [{t}, {h}, value_dim], got {tuple(v.shape)}")
    vd = v.shape[2]
    if g.shape not in ((t, h, kd), (t, h)):
        raise ValueError(f"{name}: g must be [{t}, {h}, {kd}] or [{t}, {h}], got {tuple(g.shape)}")
    if beta.shape != (t, h):
        raise ValueError(f"{name}: beta must be [{t}, {h}], got {tuple(beta.shape)}")
    if ssm_states.dim() != 4 or tuple(ssm_states.shape[1:]) != (h, kd, vd):
        raise ValueError(f"{name}: ssm_states must be [slots, {h}, {kd}, {vd}], got "
                         f"{tuple(ssm_states.shape)}")
    if state_indices.dim() != 1 or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: state_indices must be a 1-D int32 tensor")
    return t, h, kd, vd


def gdr_l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # FLA's l2norm (as transformers' Kimi-Linear): x / sqrt(sum(x^2) + eps)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, ssm_states: torch.Tensor | None = None,
                     query_start_loc: torch.Tensor | None = None,
                     state_indices: torch.Tensor | None = None,
                     has_initial_state: torch.Tensor | None = None, scale: float | None = None,
                     use_qk_l2norm: bool = True) -> torch.Tensor:
    # q/k [T, H, K], v [T, H, V], g [T, H, K] or [T, H], beta [T, H],
    # ssm_states [S, H, K, V] (in place) -> out [T, H, V]
    _, h, kd, vd = check_gdr_args("gated_delta_rule", q, k, v, g, beta, ssm_states,
                                  state_indices)
    if query_start_loc is None or query_start_loc.shape != (state_indices.shape[0] + 1,):
        raise ValueError("gated_delta_rule: query_start_loc must be [num_seqs + 1]")
    acc = _acc(q).dtype
    qa, ka = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        qa, ka = gdr_l2norm(qa), gdr_l2norm(ka)
    qa = qa * (kd ** -0.5 if scale is None else scale)
    va, ba = v.to(acc), beta.to(acc)
    decay = torch.exp(g.to(acc))
    decay = decay if decay.dim() == 3 else decay[:, :, None]             # [T, H, K or 1]
    out = torch.zeros(*v.shape, dtype=acc, device=v.device)
    starts = query_start_loc.tolist()
    init = [True] * len(state_indices) if has_initial_state is None else has_initial_state.tolist()
    for b, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        st = ssm_states[slot].to(acc) if init[b] else torch.zeros(h, kd, vd, dtype=acc,
                                                                  device=v.device)
        for t in range(starts[b], starts[b + 1]):
            st.mul_(decay[t][:, :, None])
            delta = (va[t] - torch.einsum("hkv,hk->hv", st, ka[t])) * ba[t][:, None]
            st.add_(ka[t][:, :, None] * delta[:, None, :])
            out[t] = torch.einsum("hkv,hk->hv", st, qa[t])
        ssm_states[slot] = st.to(ssm_states.dtype)
    return out.to(v.dtype)


def gated_delta_rule_update(ssm_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            state_indices: torch.Tensor | None = None,
                            scale: float | None = None, use_qk_l2norm: bool = True) -> torch.Tensor:
    # one token per sequence: q/k [B, H, K], v [B, H, V], g [B, H, K] or [B, H], beta [B, H]
    if state_indices is None:
        raise ValueError("gated_delta_rule_update: state_indices is required")
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return gated_delta_rule(q, k, v, g, beta, ssm_states, qsl, state_indices, None, scale,
                            use_qk_l2norm)


# ---- speculative decoding's rejection sampler: the reference lives with its engine code ----
from octavo.spec_decode.rejection import rejection_sample  # noqa: E402,F401
