"""Kernel lab: silu_and_mul and gelu_and_mul (none / tanh).

python -m octavo.bench.kernels.activation [--quick] [--tokens 256 --intermediate 11008]
Checks each registered op against octavo.ops_native, then times it (median) and prints GB/s of
input + output traffic beside this machine's copy bandwidth.
"""
import torch

from octavo import ops_native
from octavo.bench.kernels.common import check, copy_bandwidth, parse, parser, report, time_fn


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=11008, help="D: input is [T, 2*D]")
    args = parse(p)
    if args.quick:
        args.tokens, args.intermediate = 32, 1024
    args.repeats = args.repeats or (5 if args.quick else 50)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"activation {args.dtype} T={args.tokens} D={args.intermediate}; "
          f"copy bandwidth {copy_gbs:.1f} GB/s")
    x = torch.randn(args.tokens, 2 * args.intermediate, dtype=dtype)
    out = torch.empty(args.tokens, args.intermediate, dtype=dtype)
    nbytes = (x.numel() + out.numel()) * x.element_size()
    cases = [("silu_and_mul", lambda: torch.ops.octavo.silu_and_mul(out, x),
              lambda t: ops_native.silu_and_mul(t), 5),
             ("gelu_and_mul none", lambda: torch.ops.octavo.gelu_and_mul(out, x, "none"),
              lambda t: ops_native.gelu_and_mul(t, "none"), 8),
             ("gelu_and_mul tanh", lambda: torch.ops.octavo.gelu_and_mul(out, x, "tanh"),
              lambda t: ops_native.gelu_and_mul(t, "tanh"), 10)]
    for name, kernel, native, flops_per_out in cases:
        kernel()
        check(name, out, native(x), native(x.double()))
        t = time_fn(kernel, args.repeats)
        report(name, t, nbytes, flops_per_out * out.numel(), copy_gbs)
        t = time_fn(lambda: native(x), args.repeats)
        report(f"{name} (ops_native, for scale)", t, nbytes, flops_per_out * out.numel(), copy_gbs)


if __name__ == "__main__":
    main()
