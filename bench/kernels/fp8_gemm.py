"""Kernel lab: fp8_gemm (E4M3 weights, 1 byte each) vs the same layer in bf16/fp32 through torch.

python -m octavo.bench.kernels.fp8_gemm [--quick] [--rows 1,8,64] [--shapes 2048x2048] [--scales channel]
Shapes are K x N; --scales is tensor, channel or block (128 x 128); --act dynamic adds per-token
e4m3 activations (W8A8). GB/s counts the stored weight bytes (codes + fp32 scales) plus
activations, beside this machine's copy bandwidth; the torch row counts the float weight's bytes.
Weights cycle through copies beyond the L3 cache.
"""
import torch
import torch.nn.functional as F

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)

SHAPES = {"2048x2048 (attention)": (2048, 2048), "2048x8192 (MLP up)": (2048, 8192),
          "8192x2048 (MLP down)": (8192, 2048)}


def _weight(n, k, kind, g):
    w = torch.randn(n, k, generator=g) / k ** 0.5
    block = (128, 128) if kind == "block" else None
    if kind == "tensor":
        s = (w.abs().amax() / 448).reshape(())
        return ops_native.fp8_quantize(w, s), s, None
    q, s = ops_native.fp8_quantize_weight(w, block)
    return q, s, block


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8,64", help="comma-separated M values")
    p.add_argument("--shapes", default=None, help="comma-separated KxN (default: three presets)")
    p.add_argument("--scales", default="channel", choices=["tensor", "channel", "block"])
    p.add_argument("--act", default=None, choices=["dynamic"], help="W8A8: per-token e4m3 activations")
    p.add_argument("--cold-mib", type=int, default=256, help="weight copies totalling this much")
    args = parse(p)
    if args.device != "cpu" and args.dtype == "float32":
        p.error("the CUDA fp8_gemm kernel runs bf16/fp16 activations: use --dtype bfloat16")
    shapes = ({s: tuple(map(int, s.split("x"))) for s in args.shapes.split(",")} if args.shapes
              else dict(SHAPES))
    rows = [int(m) for m in args.rows.split(",")]
    if args.quick:
        shapes, rows = {"quick": (256, 200), "odd": (130, 77)}, [1, 9]
    args.repeats = args.repeats or (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"fp8_gemm {args.dtype} scales={args.scales} act={args.act or 'weight-only'} on "
          f"{args.device} threads={torch.get_num_threads()}; copy bandwidth {copy_gbs:.1f} GB/s "
          "(bytes = weight as stored + x + out)")
    g = generator(0)
    for name, (k, n) in shapes.items():
        q, s, block = _weight(n, k, args.scales, g)
        wbytes = q.numel() + s.numel() * 4
        copies = 1 if args.quick else max(1, -(-(args.cold_mib << 20) // wbytes))
        ws = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies - 1)]
        dense = ops_native.fp8_dequantize(q, s, block).to(dtype)
        fcopies = 1 if args.quick else max(1, -(-(args.cold_mib << 20) // (dense.numel() * dense.element_size())))
        denses = [dense] + [dense.clone() for _ in range(fcopies - 1)]
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            out = ops.fp8_gemm(x, q, s, block, None, args.act)
            xq, xs = ops_native.fp8_activations(x, args.act)
            xe = xq.double() * xs.double()[:, None] if xs is not None else x.double()
            check(f"{name} M={m}", out, ops_native.fp8_gemm(x, q, s, block, None, args.act),
                  ops_native.fp8_gemm(xe.cpu(), q.cpu(), s.cpu(), block).to(out.device))
            act = m * (k + n) * x.element_size()
            state = {"i": 0, "j": 0}

            def fp8_call():
                state["i"] = (state["i"] + 1) % len(ws)
                return ops.fp8_gemm(x, *ws[state["i"]], block, None, args.act)

            def dense_call():
                state["j"] = (state["j"] + 1) % len(denses)
                return F.linear(x, denses[state["j"]])

            report(f"{name} M={m} octavo.fp8_gemm", time_fn(fp8_call, args.repeats),
                   wbytes + act, 2 * m * n * k, copy_gbs)
            report(f"{name} M={m} torch F.linear {args.dtype}", time_fn(dense_call, args.repeats),
                   dense.numel() * dense.element_size() + act, 2 * m * n * k, copy_gbs)


if __name__ == "__main__":
    main()
