"""Kernel lab: fused_moe_fp8 (routed gated expert MLPs on e4m3 experts, 128 x 128 block scales)
vs the same experts in the activations' dtype (fused_moe) and vs dequantize + a torch loop.

python -m octavo.bench.kernels.fused_moe_fp8 [--quick] [--tokens 1,8,64] [--shapes 1024x2816x8x2]
Shapes are H x I x E x top_k. GB/s counts the expert weights actually read (1 byte each for fp8,
plus their scales) and the activations, beside this machine's copy bandwidth. Both octavo ops run
on weights prepared once (ops.prepare_moe_fp8_weights / prepare_moe_weights), as the layers do.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)
from octavo.bench.kernels.fused_moe import torch_loop

SHAPES = {"8x top-2": (1024, 2816, 8, 2), "64x top-6": (1024, 512, 64, 6)}
BLOCK = (128, 128)


def quantize(w: torch.Tensor):
    """[E, N, K] -> (e4m3 codes, block scales [E, N/128, K/128])."""
    pairs = [ops_native.fp8_quantize_weight(w[x], BLOCK) for x in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def dequantized(q, s):
    return torch.stack([ops_native.fp8_dequantize(q[x], s[x], BLOCK) for x in range(q.shape[0])])


def run_moe_lab(doc: str, title: str, prepare, measure, tokens: str = "1,8,64") -> None:
    """The MoE labs' shared driver (this one and fused_moe_int4): --tokens / --shapes (or the
    presets; --quick: two small odd shapes), then for each shape prepare(h, i, e, g, dtype) ->
    state once, and for each T measure(state, name, shape, hidden, tw, ti, repeats, copy_gbs)."""
    p = parser(doc.splitlines()[0])
    p.add_argument("--tokens", default=tokens, help="comma-separated T values")
    p.add_argument("--shapes", default=None, help="comma-separated HxIxExK (default: two presets)")
    args = parse(p)
    shapes = ({s: tuple(map(int, s.split("x"))) for s in args.shapes.split(",")} if args.shapes
              else dict(SHAPES))
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        shapes, tokens = {"quick": (256, 192, 6, 2), "odd": (200, 72, 5, 5)}, [1, 9]
    repeats = args.repeats or (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"{title} {args.dtype} activations on {args.device} threads={torch.get_num_threads()}; "
          f"copy bandwidth {copy_gbs:.1f} GB/s (bytes = selected experts' weights + hidden + out)")
    g = generator(0)
    for name, (h, i, e, k) in shapes.items():
        state = prepare(h, i, e, g, dtype)
        for t in tokens:
            hidden = torch.randn(t, h, generator=g).to(dtype)
            tw, ti = ops.topk_routing(torch.randn(t, e, generator=g), k)
            measure(state, name, (h, i, e, k), hidden, tw, ti, repeats, copy_gbs)


def _prepare(h, i, e, g, dtype):
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    d13, d2 = dequantized(q13, s13).to(dtype), dequantized(q2, s2).to(dtype)
    return (q13, s13, q2, s2, d13, d2, ops.prepare_moe_fp8_weights(q13, q2, s13, s2, BLOCK),
            ops.prepare_moe_weights(d13, d2))


def _measure(state, name, shape, hidden, tw, ti, repeats, copy_gbs):
    q13, s13, q2, s2, d13, d2, fp8, plain = state
    (h, i, e, k), t, dtype = shape, hidden.shape[0], hidden.dtype
    out = ops.fused_moe_fp8_prepared(hidden, fp8, tw, ti)
    exact = ops_native.fused_moe_fp8(hidden.double(), q13, q2, s13, s2, tw, ti, "silu", BLOCK)
    check(f"{name} T={t}", out, torch_loop(hidden, d13, d2, tw, ti), exact)
    selected = ti.unique().numel()
    scale_bytes = (s13.numel() + s2.numel()) * 4 // e
    act_bytes = 2 * hidden.numel() * hidden.element_size()
    flops = 2 * 3 * h * i * t * k
    runs = {"octavo.fused_moe_fp8": (lambda: ops.fused_moe_fp8_prepared(hidden, fp8, tw, ti),
                                     selected * (3 * h * i + scale_bytes)),
            f"octavo.fused_moe ({str(dtype).split('.')[-1]} weights)":
                (lambda: ops.fused_moe_prepared(hidden, plain, tw, ti),
                 selected * 3 * h * i * d13.element_size()),
            "dequantize + torch loop":
                (lambda: torch_loop(hidden, dequantized(q13, s13).to(dtype),
                                    dequantized(q2, s2).to(dtype), tw, ti),
                 e * (3 * h * i + scale_bytes))}
    for label, (fn, weight_bytes) in runs.items():
        report(f"{name} [{h}x{i}, {selected}/{e} experts] T={t} {label}",
               time_fn(fn, repeats), weight_bytes + act_bytes, flops, copy_gbs)


def main():
    run_moe_lab(__doc__, "fused_moe_fp8", _prepare, _measure)


if __name__ == "__main__":
    main()
