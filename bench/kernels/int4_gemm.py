"""Kernel lab: int4_gemm (4-bit weight-only GEMM) vs the same layer in bf16/fp32 through torch.

python -m octavo.bench.kernels.int4_gemm [--quick] [--rows 1,8,64] [--shapes 2048x2048,2048x8192]
Shapes are K x N (group size --group-size, default 128). GB/s counts the packed weight bytes
(codes + fp32 scales/offsets) plus activations, beside this machine's copy bandwidth; the torch
row counts the float weight's bytes. Weights cycle through copies beyond the L3 cache.
"""
import torch
import torch.nn.functional as F

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)

SHAPES = {"2048x2048 (attention)": (2048, 2048), "2048x8192 (MLP up)": (2048, 8192),
          "8192x2048 (MLP down)": (8192, 2048)}


def _weight(n, k, group_size, g):
    gs, groups = ops_native.int4_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, groups, generator=g) + 0.5) / (8 * k ** 0.5)
    z = torch.randint(0, 16, (n, groups), generator=g).float()
    return q, s, z


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8,64", help="comma-separated M values")
    p.add_argument("--shapes", default=None, help="comma-separated KxN (default: three presets)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--cold-mib", type=int, default=256, help="weight copies totalling this much")
    args = parse(p)
    if args.device == "cuda" and args.dtype not in ("bfloat16", "float16"):
        p.error("--device cuda: the CUDA int4 kernel runs on tensor cores: use --dtype bfloat16 "
                "or float16")
    shapes = ({s: tuple(map(int, s.split("x"))) for s in args.shapes.split(",")} if args.shapes
              else dict(SHAPES))
    rows = [int(m) for m in args.rows.split(",")]
    if args.quick:
        shapes, rows = {"quick": (256, 200), "odd": (130, 77)}, [1, 9]
    args.repeats = args.repeats or (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    gs = args.group_size
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    where = "cuda" if args.device == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"int4_gemm {args.dtype} group {gs} on {where}; copy "
          f"bandwidth {copy_gbs:.1f} GB/s (bytes = weight as stored + x + out)")
    g = generator(0)
    for name, (k, n) in shapes.items():
        q, s, z = _weight(n, k, gs, g)
        w = ops_native.int4_prepare(q, s, z, gs)
        wbytes = w.packed.numel() + w.scales_offsets.numel() * 4
        copies = 1 if args.quick else max(1, -(-(args.cold_mib << 20) // wbytes))
        ws = [w] + [w._replace(packed=w.packed.clone(), scales_offsets=w.scales_offsets.clone())
                    for _ in range(copies - 1)]
        dense = ops_native.int4_dequantize(q, s, z, gs).to(dtype)
        fcopies = 1 if args.quick else max(1, -(-(args.cold_mib << 20) // (dense.numel() * dense.element_size())))
        denses = [dense] + [dense.clone() for _ in range(fcopies - 1)]
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            out = ops.int4_gemm_prepared(x, w)
            exact = ops_native.int4_gemm(x.double(), q, s, z, gs)
            check(f"{name} M={m}", out, ops_native.int4_gemm(x, q, s, z, gs), exact)
            act = 2 * m * (k + n) * x.element_size() // 2
            state = {"i": 0, "j": 0}

            def int4_call():
                state["i"] = (state["i"] + 1) % len(ws)
                return ops.int4_gemm_prepared(x, ws[state["i"]])

            def dense_call():
                state["j"] = (state["j"] + 1) % len(denses)
                return F.linear(x, denses[state["j"]])

            report(f"{name} M={m} octavo.int4_gemm", time_fn(int4_call, args.repeats),
                   wbytes + act, 2 * m * n * k, copy_gbs)
            report(f"{name} M={m} torch F.linear {args.dtype}", time_fn(dense_call, args.repeats),
                   dense.numel() * dense.element_size() + act, 2 * m * n * k, copy_gbs)


if __name__ == "__main__":
    main()
