"""Kernel lab: int8_gemm (W8A8) and int8_woq_gemm (int8 weight-only) vs the layer through torch.

python -m octavo.bench.kernels.int8_gemm [--quick] [--rows 1,8,64] [--shapes 2048x2048,2048x8192]
Shapes are K x N. GB/s counts the weight bytes as stored (int8 codes + fp32 scales) plus
activations, beside this machine's copy bandwidth; the torch row counts the float weight's
bytes. Weights cycle through copies beyond the L3 cache.
"""
import torch
import torch.nn.functional as F

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)

SHAPES = {"2048x2048 (attention)": (2048, 2048), "2048x8192 (MLP up)": (2048, 8192),
          "8192x2048 (MLP down)": (8192, 2048)}


def _copies(w, nbytes, cold_mib, quick):
    """`w` (a tuple of tensors and ints) and copies of it, cold_mib in all."""
    n = 1 if quick else max(1, -(-(cold_mib << 20) // nbytes))
    fields = lambda: [t.clone() if isinstance(t, torch.Tensor) else t for t in w]  # noqa: E731
    make = (lambda f: type(w)(*f)) if hasattr(w, "_fields") else tuple
    return [w] + [make(fields()) for _ in range(n - 1)]


def _cycle(fn, items):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])
    return call


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8,64", help="comma-separated M values")
    p.add_argument("--shapes", default=None, help="comma-separated KxN (default: three presets)")
    p.add_argument("--group-size", type=int, default=32, help="weight-only group size")
    p.add_argument("--cold-mib", type=int, default=256, help="weight copies totalling this much")
    args = parse(p)
    shapes = ({s: tuple(map(int, s.split("x"))) for s in args.shapes.split(",")} if args.shapes
              else dict(SHAPES))
    rows = [int(m) for m in args.rows.split(",")]
    if args.quick:
        shapes, rows = {"quick": (256, 200), "odd": (131, 77)}, [1, 9]
    args.repeats = args.repeats or (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    gs = args.group_size
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    where = "cuda" if args.device == "cuda" else f"cpu threads={torch.get_num_threads()}"
    # W8A16 on a GPU: the CUDA kernel where it takes the group size (whole 16-wide K steps),
    # else the plain-PyTorch reference
    woq = "int8_woq_gemm" if args.device == "cpu" or ops.int8_woq_cuda_supported(
        dtype, max(k for k, _ in shapes.values()), gs) else "int8_woq_gemm reference"
    print(f"int8_gemm {args.dtype} on {where}; copy bandwidth "
          f"{copy_gbs:.1f} GB/s (bytes = weight as stored + x + out)")
    g = generator(0)
    for name, (k, n) in shapes.items():
        wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        s = (torch.rand(n, generator=g) + 0.5) / (64 * k ** 0.5)
        w8 = ops_native.int8_prepare(wq, s)
        _, groups = ops_native.int4_groups(k, gs)
        sg = (torch.rand(n, groups, generator=g) + 0.5) / (64 * k ** 0.5)
        og = torch.randn(n, groups, generator=g) * sg
        wo = ops_native.int8_woq_prepare(wq, sg, og, gs)
        w8_bytes = w8.packed.numel() + 8 * n
        wo_bytes = wo.packed.numel() + 4 * wo.scales_offsets.numel()
        w8s = _copies(w8, w8_bytes, args.cold_mib, args.quick)
        wos = _copies(wo, wo_bytes, args.cold_mib, args.quick)
        dense = ops_native.int8_woq_dequantize(wq, sg, og, gs).to(dtype)
        denses = _copies((dense,), dense.numel() * dense.element_size(), args.cold_mib, args.quick)
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            act = m * (k + n) * x.element_size()
            xq, sx, azp = ops_native.int8_quantize_per_token(x)
            check(f"{name} M={m} W8A8", ops.int8_gemm_prepared(x, w8),
                  ops_native.int8_gemm(x, wq, s), ops_native.int8_scaled_mm(xq, sx, azp, wq, s, None,
                                                                           torch.float64))
            check(f"{name} M={m} W8A16 g{gs}", ops.int8_woq_gemm_prepared(x, wo),
                  ops_native.int8_woq_gemm(x, wq, sg, og, gs),
                  ops_native.int8_woq_gemm(x.double(), wq, sg, og, gs))
            report(f"{name} M={m} octavo.int8_gemm (W8A8)",
                   time_fn(_cycle(lambda w: ops.int8_gemm_prepared(x, w), w8s), args.repeats),
                   w8_bytes + act, 2 * m * n * k, copy_gbs)
            report(f"{name} M={m} octavo.{woq} (W8A16 g{gs})",
                   time_fn(_cycle(lambda w: ops.int8_woq_gemm_prepared(x, w), wos), args.repeats),
                   wo_bytes + act, 2 * m * n * k, copy_gbs)
            report(f"{name} M={m} torch F.linear {args.dtype}",
                   time_fn(_cycle(lambda d: F.linear(x, d[0]), denses), args.repeats),
                   dense.numel() * dense.element_size() + act, 2 * m * n * k, copy_gbs)


if __name__ == "__main__":
    main()
