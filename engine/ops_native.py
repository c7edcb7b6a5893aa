"""Plain-PyTorch references for every kernel op (same Python signatures as octavo.ops).

These define the semantics the C++/CUDA kernels are tested against (tests/kernels). They compute
in fp32 (fp64 for fp64 inputs, which the tests use as the exact reference) and store in the
inputs' dtype, like the kernels do.
"""
from __future__ import annotations

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


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # key/value: [T, Hk, hd]; caches: [num_blocks, block_size, Hk, hd]; slot -1 is skipped
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


def _gather_context(cache: torch.Tensor, block_row: torch.Tensor, ctx: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, Hk, hd] -> [ctx, Hk, hd] in the accumulation type
    block_size = cache.shape[1]
    nb = (ctx + block_size - 1) // block_size
    blocks = block_row[:nb].long()
    return _acc(cache[blocks].flatten(0, 1)[:ctx])


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, sliding_window: int = 0,
                    soft_cap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    # query: [T, Hq, hd]; caches: [num_blocks, block_size, Hk, hd]; query_start_loc: [S+1] int32;
    # seq_lens: [S] int32; block_table: [S, max_blocks] int32; returns out [T, Hq, hd].
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
        k = _gather_context(key_cache, block_table[s], ctx).permute(1, 2, 0)  # [Hk, hd, ctx]
        v = _gather_context(value_cache, block_table[s], ctx).transpose(0, 1)  # [Hk, ctx, hd]
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
