"""Kernel lab: Mamba-1 selective scan, its decode step and the causal conv1d vs the references.

python -m octavo.bench.kernels.selective_scan [--quick] [--dim 1536] [--dstate 16]
    [--prefill 1x2048,8x256] [--decode 1,32,256]
Prefill cases are sequences x tokens (selective_scan, causal_conv1d); decode cases are batch
sizes (selective_state_update, causal_conv1d_update). GB/s counts the activations read and
written plus each used state slot read and written once, beside this machine's copy bandwidth;
GFLOP/s counts 6 per (token, channel, state column), the exp as one.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)


def _inputs(t, d, n, num_seqs, dtype, g):
    proj = torch.randn(t, 3 * d, generator=g).to(dtype)     # u, delta, z: views of one buffer
    bc = torch.randn(t, 2 * n, generator=g).to(dtype)
    return dict(u=proj[:, :d], delta=proj[:, d:2 * d] * 0.5 - 1.0, z=proj[:, 2 * d:],
                B=bc[:, :n], C=bc[:, n:], A=-torch.exp(torch.randn(d, n, generator=g) * 0.5),
                D_skip=torch.randn(d, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1,
                states=torch.randn(num_seqs, d, n, generator=g))


def _scan(op, x, states, q, slots, decode):
    if decode:
        return op.selective_state_update(states, x["u"], x["delta"], x["A"], x["B"], x["C"],
                                         x["D_skip"], x["z"], x["delta_bias"], True, slots)
    return op.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D_skip"], x["z"],
                             x["delta_bias"], True, states, q, slots)


def _exact(x):
    return {k: v.double() for k, v in x.items()}


def bench_scan(name, num_seqs, seqlen, d, n, dtype, repeats, copy_gbs, g, decode):
    t = num_seqs * seqlen
    x = _inputs(t, d, n, num_seqs, dtype, g)
    q = torch.arange(0, t + 1, seqlen, dtype=torch.int32)
    slots = torch.arange(num_seqs, dtype=torch.int32)
    out = _scan(ops, x, x["states"].clone(), q, slots, decode)
    native = _scan(ops_native, x, x["states"].clone(), q, slots, decode)
    ex = _exact(x)
    exact = _scan(ops_native, ex, ex["states"], q, slots, decode)
    check(name, out, native, exact)
    states = x["states"].clone()
    act = t * (4 * d + 2 * n) * x["u"].element_size()            # u, delta, z, B, C in; out
    nbytes = act + 2 * states[:num_seqs].numel() * states.element_size()
    report(name, time_fn(lambda: _scan(ops, x, states, q, slots, decode), repeats), nbytes,
           6 * t * d * n, copy_gbs)


def _conv(op, x, w, b, states, q, slots, decode):
    if decode:
        return op.causal_conv1d_update(x, states, w, b, slots, "silu")
    return op.causal_conv1d(x, w, b, states, q, slots, None, "silu")


def bench_conv(name, num_seqs, seqlen, d, width, dtype, repeats, copy_gbs, g, decode):
    t = num_seqs * seqlen
    x = torch.randn(t, d, generator=g).to(dtype)
    w, b = torch.randn(d, width, generator=g) * 0.5, torch.randn(d, generator=g)
    states = torch.randn(num_seqs, d, width - 1, generator=g).to(dtype)
    q = torch.arange(0, t + 1, seqlen, dtype=torch.int32)
    slots = torch.arange(num_seqs, dtype=torch.int32)
    out = _conv(ops, x, w, b, states.clone(), q, slots, decode)
    native = _conv(ops_native, x, w, b, states.clone(), q, slots, decode)
    exact = _conv(ops_native, x.double(), w.double(), b.double(), states.double(), q, slots,
                  decode)
    check(name, out, native, exact)
    nbytes = 2 * (x.numel() + states.numel()) * x.element_size()
    report(name, time_fn(lambda: _conv(ops, x, w, b, states, q, slots, decode), repeats), nbytes,
           2 * t * d * width, copy_gbs)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1536, help="channels D (mamba-130m: 1536)")
    p.add_argument("--dstate", type=int, default=16, help="state columns N")
    p.add_argument("--width", type=int, default=4, help="conv width W")
    p.add_argument("--prefill", default="1x2048,8x256", help="comma-separated SEQSxTOKENS")
    p.add_argument("--decode", default="1,32,256", help="comma-separated batch sizes")
    args = parse(p)
    d, n, width = args.dim, args.dstate, args.width
    prefill = [tuple(map(int, c.split("x"))) for c in args.prefill.split(",")]
    decode = [int(c) for c in args.decode.split(",")]
    if args.quick:
        d, prefill, decode = 67, [(1, 37), (3, 9)], [1, 5]
    args.repeats = args.repeats or (3 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"selective_scan {args.dtype} D={d} N={n} W={width} on {args.device} "
          f"threads={torch.get_num_threads()}; copy bandwidth {copy_gbs:.1f} GB/s")
    g = generator(0)
    for seqs, seqlen in prefill:
        bench_scan(f"selective_scan {seqs}x{seqlen}", seqs, seqlen, d, n, dtype, args.repeats,
                   copy_gbs, g, decode=False)
        bench_conv(f"causal_conv1d {seqs}x{seqlen}", seqs, seqlen, d, width, dtype,
                   args.repeats, copy_gbs, g, decode=False)
    for batch in decode:
        bench_scan(f"selective_state_update B={batch}", batch, 1, d, n, dtype, args.repeats,
                   copy_gbs, g, decode=True)
        bench_conv(f"causal_conv1d_update B={batch}", batch, 1, d, width, dtype, args.repeats,
                   copy_gbs, g, decode=True)


if __name__ == "__main__":
    main()
