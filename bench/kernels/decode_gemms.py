"""Kernel lab: a decoder's GEMMs at one batched-decode step, back to back, as the engine runs them.

python -m octavo.bench.kernels.decode_gemms [--quick] [--preset small|medium] [--rows 1,16,32]
Every layer's qkv, o, gate_up and down linear (then the LM head) through octavo.linear_packed
(bf16 panels, as models/layers/cpu_gemm.py packs them), M rows each. `cold`: every layer has
weights of its own, placed as the engine places them (octavo.weight_memory: huge pages where
the kernel allows), so a step streams them all from memory, as decode does; `hot`: the first
layer's weights every time (from the caches as far as they fit). GFLOP/s of the whole sequence;
GB/s = weight bytes streamed per second.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import check, copy_bandwidth, parse, parser, report, time_fn

# hidden, ffn, layers, qkv outputs, vocab: the peers' random Llamas (../shared/peers)
PRESETS = {"small": (768, 2048, 12, 2304, 32000), "medium": (2048, 5632, 16, 3072, 32000)}


def packed(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    # ops.pack_linear_panels: the engine's packing, into octavo.weight_memory's placement
    return ops.pack_linear_panels(torch.randn(n, k, generator=g, dtype=torch.bfloat16) * k ** -0.5)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--rows", default="1,16,32", help="comma-separated M values")
    args = parse(p)
    if args.device != "cpu" or args.dtype != "bfloat16":
        p.error("the packed bf16 GEMM is a CPU kernel: run with --device cpu --dtype bfloat16")
    h, f, layers, qkv, vocab = PRESETS[args.preset]
    rows = [int(r) for r in args.rows.split(",")]
    if args.quick:
        h, f, layers, qkv, vocab, rows = 256, 512, 2, 768, 1000, [1, 5]
    args.repeats = args.repeats or (3 if args.quick else 15)
    shapes = [(qkv, h), (h, h), (2 * f, h), (h, f)]  # (N, K) of qkv, o, gate_up, down
    g = torch.Generator().manual_seed(0)
    weights = [[packed(n, k, g) for n, k in shapes] for _ in range(layers)]
    head = packed(vocab, h, g)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"decode_gemms {args.preset if not args.quick else 'quick'}: {layers} layers x "
          f"{len(shapes)} GEMMs + LM head, threads={torch.get_num_threads()}, "
          f"copy bandwidth {copy_gbs:.1f} GB/s")
    layer_bytes = sum(n * k * 2 for n, k in shapes)
    w_down = ops_native.unpack_linear_panels(weights[0][3], h, f)  # the check's plain weight
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g, dtype=torch.bfloat16) for k in (h, f)}
        outs = {n: torch.empty(m, n, dtype=torch.bfloat16) for n in (qkv, h, 2 * f, vocab)}
        # the packed op against the plain linear on the unpacked weight (first layer, down)
        x = xs[f]
        torch.ops.octavo.linear_packed(outs[h], x, weights[0][3], None)
        check(f"M={m} down", outs[h], ops_native.linear(x, w_down, None),
              ops_native.linear(x.double(), w_down.double(), None))

        def step(hot: bool) -> None:
            for layer in range(layers):
                for (n, k), w in zip(shapes, weights[0 if hot else layer]):
                    torch.ops.octavo.linear_packed(outs[n], xs[k], w, None)
            torch.ops.octavo.linear_packed(outs[vocab], xs[h], head, None)

        flops = 2 * m * (layers * sum(n * k for n, k in shapes) + vocab * h)
        for label, hot in (("cold", False), ("hot", True)):
            t = time_fn(lambda: step(hot), args.repeats)
            nbytes = (layer_bytes if hot else layers * layer_bytes) + vocab * h * 2
            report(f"M={m} {label}", t, nbytes, flops, copy_gbs)


if __name__ == "__main__":
    main()
