"""Kernel lab: the CPU linears (out = x @ weight^T + bias) vs oneDNN-prepacked and F.linear.

python -m octavo.bench.kernels.linear [--quick] [--rows 1,2,4,8,32] [--shapes 2048x5632,5632x2048]
Shapes are K x N; the defaults are the decode linears of a 100M Llama (hidden 768, vocab 32000).
octavo.linear reads the plain [N, K] weight; octavo.linear_packed (bf16 or fp32) the 64-output
panels of ops_native.pack_linear_panels, the layout models/layers/cpu_gemm.py uses. Each line
gives the weight bytes streamed per second and their share of this machine's read ceiling
(torch.sum over a 256 MiB buffer, measured in the same run), the figure that bounds decode.
"""
import torch
import torch.nn.functional as F

from octavo import ops_native
from octavo.bench.kernels.common import check, copy_bandwidth, parse, parser, time_fn

SHAPES = {"qkv": (768, 2304), "o": (768, 768), "gate_up": (768, 4096), "down": (2048, 768),
          "lm_head": (768, 32000)}


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of a plain streaming read (torch.sum of an fp32 buffer beyond the caches)."""
    buf = torch.ones(nbytes // 4)
    return nbytes / time_fn(lambda: buf.sum(), repeats) / 1e9


def _cycling(items):
    """A zero-argument function returning the items in turn."""
    state = {"i": -1}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def _contenders(x, ws, b):
    """name -> zero-argument callable for each implementation that runs here; every call takes
    the next weight copy of ws, so with enough copies the weights stream from DRAM as in a model."""
    out = torch.empty(x.shape[0], ws[0].shape[0], dtype=x.dtype)
    w = _cycling(ws)
    fns = {"octavo.linear": lambda: torch.ops.octavo.linear(out, x, w(), b)}
    if x.dtype in (torch.bfloat16, torch.float32):
        panels = _cycling([ops_native.pack_linear_panels(c) for c in ws])
        fns["octavo.linear_packed"] = lambda: torch.ops.octavo.linear_packed(out, x, panels(), b)
    fns["F.linear"] = lambda: F.linear(x, w(), b)
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    if onednn and x.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("oneDNN prepacked: skipped, this CPU has no bf16 GEMM for it (needs AVX-512 or AVX-NE-CONVERT)")
        onednn = False
    if onednn:
        packed = _cycling([torch.ops.mkldnn._reorder_linear_weight(c, 32) for c in ws])
        fns["oneDNN prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed(), b, "none", [], "")
    return out, fns


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,32", help="comma-separated M values")
    p.add_argument("--shapes", default=None, help="comma-separated KxN (default: the 100M Llama's)")
    p.add_argument("--bias", action="store_true")
    p.add_argument("--cold-mib", type=int, default=256,
                   help="cycle through weight copies totalling this much (beyond the L3 cache)")
    args = parse(p)
    if args.device != "cpu":
        p.error("octavo.linear is a CPU kernel; run with --device cpu")
    shapes = ({f"{k}x{n}": (k, n) for k, n in (tuple(map(int, s.split("x"))) for s in args.shapes.split(","))}
              if args.shapes else dict(SHAPES))
    rows = [int(r) for r in args.rows.split(",")]
    if args.quick:
        shapes, rows = {"o": (768, 768), "odd": (769, 133)}, [1, 5]
    args.repeats = args.repeats or (5 if args.quick else 30)
    dtype = getattr(torch, args.dtype)
    ceiling = 64 << 20 if args.quick else 256 << 20
    read_gbs, copy_gbs = read_bandwidth(ceiling), copy_bandwidth(ceiling)
    print(f"linear {args.dtype} bias={args.bias} threads={torch.get_num_threads()} "
          f"capability={torch.backends.cpu.get_cpu_capability()}; read ceiling {read_gbs:.1f} GB/s "
          f"(torch.sum), copy {copy_gbs:.1f} GB/s (read + write); GB/s below = weight bytes / time, "
          f"weights cycled through {0 if args.quick else args.cold_mib} MiB of copies")
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, dtype=dtype) / k ** 0.5
        b = torch.randn(n, dtype=dtype) if args.bias else None
        for m in rows:
            x = torch.randn(m, k, dtype=dtype)
            copies = 1 if args.quick else max(1, (args.cold_mib << 20) // (w.numel() * w.element_size()))
            out, fns = _contenders(x, [w] + [w.clone() for _ in range(copies - 1)], b)
            bd = None if b is None else b.double()
            native, exact = ops_native.linear(x, w, b), ops_native.linear(x.double(), w.double(), bd)
            torch.ops.octavo.linear(out, x, w, b)
            check(f"{name} M={m} linear", out, native, exact)
            if "octavo.linear_packed" in fns:
                torch.ops.octavo.linear_packed(out, x, ops_native.pack_linear_panels(w), b)
                check(f"{name} M={m} linear_packed", out, native, exact)
            wbytes = w.numel() * w.element_size()
            for label, fn in fns.items():
                t = time_fn(fn, args.repeats)
                gbs = wbytes / t / 1e9
                print(f"{name} [{k}->{n}] M={m} {label:<22} {t * 1e3:9.3f} ms {gbs:7.1f} GB/s "
                      f"({gbs / read_gbs:4.0%} of read) {2 * m * n * k / t / 1e9:8.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
