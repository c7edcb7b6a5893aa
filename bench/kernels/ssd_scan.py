"""Kernel lab: Mamba-2 SSD scan (prefill) and state update (decode) vs transformers' torch path.

python -m octavo.bench.kernels.ssd_scan [--quick] [--tokens 256,2048] [--batch 1,32]
Shapes are H x P x N x G (heads, head dim, state, groups). GB/s counts x, dt, B, C and out once
plus the state slots read and written; FLOP/s counts the recurrence's 2 multiply-adds per state
element and token. Beside octavo: transformers' chunked SSD einsums (mamba2_chunk_scan, the
Mamba-2 torch fallback) and its selective_state_update, when transformers is installed.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)

# Mamba2-130m / -2.7b mixers (24 / 80 heads of 64, state 128, one group)
SHAPES = {"mamba2-130m": (24, 64, 128, 1), "mamba2-2.7b": (80, 64, 128, 1)}
CHUNK = 256


def _transformers():
    try:
        from transformers.models.mamba2 import modeling_mamba2 as mm
    except ImportError:
        return None
    return mm


def _inputs(seq_lens, h, p, n, g, dtype, gen):
    t = sum(seq_lens)
    x = torch.randn(t, h, p, generator=gen).to(dtype)
    dt = (torch.randn(t, h, generator=gen) - 2).to(dtype)
    A = -torch.rand(h, generator=gen) - 0.5
    B = torch.randn(t, g, n, generator=gen).to(dtype)
    C = torch.randn(t, g, n, generator=gen).to(dtype)
    D = torch.randn(h, generator=gen)
    bias = torch.randn(h, generator=gen) * 0.1
    states = torch.randn(len(seq_lens), h, p, n, generator=gen) * 0.1
    qsl = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    idx = torch.arange(len(seq_lens), dtype=torch.int32)
    return x, dt, A, B, C, D, bias, states, qsl, idx


def _bytes(t, b, h, p, n, g, dtype):
    act = torch.finfo(dtype).bits // 8
    return act * (2 * t * h * p + t * h + 2 * t * g * n) + 2 * 4 * b * h * p * n


def prefill(name, h, p, n, g, t, dtype, args, copy_gbs, gen, mm):
    x, dt, A, B, C, D, bias, states, qsl, idx = _inputs([t], h, p, n, g, dtype, gen)

    def run(st, fn=ops.ssd_chunk_scan, cast=None):
        xx, dd, aa, bb, cc, DD, bi = (v if cast is None else v.to(cast)
                                      for v in (x, dt, A, B, C, D, bias))
        return fn(xx, dd, aa, bb, cc, CHUNK, DD, bi, True, (0.0, float("inf")), st, qsl, idx, None)

    out = run(states.clone())
    exact = run(states.double(), ops_native.ssd_chunk_scan, torch.float64)
    check(f"{name} T={t}", out, run(states.clone(), ops_native.ssd_chunk_scan), exact)
    nbytes, flops = _bytes(t, 1, h, p, n, g, dtype), 4 * t * h * p * n
    st = states.clone()
    fns = {"octavo.ssd_chunk_scan": lambda: run(st)}
    if mm is not None:
        fns[f"transformers mamba2_chunk_scan (chunk {CHUNK})"] = lambda: mm.mamba2_chunk_scan(
            x[None], dt[None], A, B[None], C[None], CHUNK, D=D, dt_bias=bias,
            initial_states=states[:1], dt_softplus=True, return_final_states=True)
    for label, fn in fns.items():
        report(f"{name} prefill T={t} {label}", time_fn(fn, args.repeats), nbytes, flops, copy_gbs)


def decode(name, h, p, n, g, b, dtype, args, copy_gbs, gen, mm):
    x, dt, A, B, C, D, bias, states, _, idx = _inputs([1] * b, h, p, n, g, dtype, gen)
    run = lambda st, fn=ops.ssd_state_update, cast=None: fn(  # noqa: E731
        st, *[v if cast is None else v.to(cast) for v in (x, dt, A, B, C, D, bias)], True,
        (0.0, float("inf")), idx)
    out = run(states.clone())
    exact = run(states.double(), ops_native.ssd_state_update, torch.float64)
    check(f"{name} B={b}", out, run(states.clone(), ops_native.ssd_state_update), exact)
    nbytes, flops = _bytes(b, b, h, p, n, g, dtype), 4 * b * h * p * n
    st = states.clone()
    fns = {"octavo.ssd_state_update": lambda: run(st)}
    if mm is not None:
        xs = (dt[:, :, None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n))
        ds = (D[:, None].expand(-1, p), bias[:, None].expand(-1, p))
        fns["transformers selective_state_update"] = lambda: mm.mamba2_selective_state_update(
            st, x, xs[0], xs[1], B, C, D=ds[0], dt_bias=ds[1], dt_softplus=True)
    for label, fn in fns.items():
        report(f"{name} decode B={b} {label}", time_fn(fn, args.repeats), nbytes, flops, copy_gbs)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,2048", help="prefill lengths T")
    p.add_argument("--batch", default="1,32", help="decode batch sizes")
    args = parse(p)
    shapes, tokens = dict(SHAPES), [int(t) for t in args.tokens.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if args.quick:
        shapes, tokens, batches = {"quick": (4, 16, 32, 2), "odd": (3, 12, 20, 1)}, [37], [1, 5]
    args.repeats = args.repeats or (3 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    mm = _transformers()
    print(f"ssd_scan {args.dtype} on {args.device} threads={torch.get_num_threads()}; copy "
          f"bandwidth {copy_gbs:.1f} GB/s (bytes = x, dt, B, C, out + fp32 states read and written)")
    gen = generator(0)
    for name, (h, hp, n, g) in shapes.items():
        for t in tokens:
            prefill(name, h, hp, n, g, t, dtype, args, copy_gbs, gen, mm)
        for b in batches:
            decode(name, h, hp, n, g, b, dtype, args, copy_gbs, gen, mm)


if __name__ == "__main__":
    main()
