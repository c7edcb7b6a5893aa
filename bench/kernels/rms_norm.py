"""Kernel lab: rms_norm and fused_add_rms_norm.

python -m octavo.bench.kernels.rms_norm [--quick] [--tokens 256 --hidden 4096]
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import check, copy_bandwidth, parse, parser, report, time_fn


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=4096)
    args = parse(p)
    if args.quick:
        args.tokens, args.hidden = 32, 1024
    args.repeats = args.repeats or (5 if args.quick else 50)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"rms_norm {args.dtype} T={args.tokens} H={args.hidden}; copy bandwidth {copy_gbs:.1f} GB/s")
    x = torch.randn(args.tokens, args.hidden, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.rand(args.hidden, dtype=dtype) + 0.5
    out = torch.empty_like(x)
    torch.ops.octavo.rms_norm(out, x, w, 1e-6)
    check("rms_norm", out, ops_native.rms_norm(x, w, 1e-6), ops_native.rms_norm(x.double(), w.double(), 1e-6))
    nbytes = 2 * x.numel() * x.element_size()
    t = time_fn(lambda: torch.ops.octavo.rms_norm(out, x, w, 1e-6), args.repeats)
    report("rms_norm", t, nbytes, 4 * x.numel(), copy_gbs)
    t = time_fn(lambda: ops_native.rms_norm(x, w, 1e-6), args.repeats)
    report("rms_norm (ops_native, for scale)", t, nbytes, 4 * x.numel(), copy_gbs)
    xk, rk = x.clone(), r.clone()
    ops.fused_add_rms_norm(xk, rk, w, 1e-6)
    xn, rn = x.clone(), r.clone()
    ops_native.fused_add_rms_norm(xn, rn, w, 1e-6)
    xe, re = x.double(), r.double()
    ops_native.fused_add_rms_norm(xe, re, w.double(), 1e-6)
    check("fused_add_rms_norm", xk, xn, xe)
    # in place: repeated calls keep the values bounded (x is re-normalized each time)
    t = time_fn(lambda: torch.ops.octavo.fused_add_rms_norm(xk, rk, w, 1e-6), args.repeats)
    report("fused_add_rms_norm", t, 2 * nbytes, 5 * x.numel(), copy_gbs)


if __name__ == "__main__":
    main()
