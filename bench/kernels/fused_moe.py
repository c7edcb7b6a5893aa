"""Kernel lab: fused_moe (top-k routed gated expert MLPs) vs a per-expert torch loop.

python -m octavo.bench.kernels.fused_moe [--quick] [--tokens 1,2,4,8,32] [--shapes 1024x2816x8x2]
Shapes are H x I x E x top_k. GB/s counts the expert weights actually read (each selected
expert's gate_up and down once) plus the activations, beside this machine's read bandwidth
(torch.sum over --cold-mib MiB) and copy bandwidth, both measured in the same run. Decode
(T=1) is a stream of the selected experts' weights: its target is the read bandwidth.
On CPU octavo runs on the weights packed once by ops.prepare_moe_weights (the layer's path).
"""
import torch
import torch.nn.functional as F

from octavo import ops, ops_native
from octavo.bench.kernels.common import check, copy_bandwidth, generator, parse, parser, time_fn

# the qwen3-moe-1b preset (16 experts, top-2), Mixtral-like (8 experts, top-2) and
# DeepSeek-like fine-grained experts (64, top-6)
SHAPES = {"qwen3-moe-1b": (1024, 1024, 16, 2), "8x top-2": (1024, 2816, 8, 2),
          "64x top-6": (1024, 512, 64, 6)}


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of reading memory once (torch.sum over nbytes of fp32): what a weight stream can reach."""
    src = torch.ones(nbytes // 4)
    return nbytes / time_fn(lambda: src.sum(), repeats) / 1e9


def report(name, seconds, nbytes, flops, read_gbs, copy_gbs):
    gbs = nbytes / seconds / 1e9
    print(f"{name:<58} {seconds * 1e3:8.3f} ms {gbs:6.1f} GB/s ({gbs / read_gbs:4.0%} of read, "
          f"{gbs / copy_gbs:4.0%} of copy) {flops / seconds / 1e9:7.1f} GFLOP/s")


def torch_loop(hidden, w13, w2, topk_weights, topk_ids):
    """What a plain PyTorch MoE block does (transformers' eager experts): F.linear per expert."""
    i = w13.shape[1] // 2
    out = torch.zeros_like(hidden)
    flat = topk_ids.flatten()
    tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    for e in flat.unique().tolist():
        sel = flat == e
        x = hidden[tokens[sel]]
        gu = F.linear(x, w13[e])
        y = F.linear(F.silu(gu[:, :i]) * gu[:, i:], w2[e])
        out.index_add_(0, tokens[sel], y * topk_weights.flatten()[sel, None].to(y.dtype))
    return out


def same_precision(hidden, w13, w2, topk_weights, topk_ids):
    """The plain reference in the kernel's dtype (every op rounds): the check's yardstick."""
    return torch_loop(hidden, w13, w2, topk_weights, topk_ids)


def _case(h, i, e, k, t, dtype, copies, g):
    w13s = [(torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype) for _ in range(copies)]
    w2s = [(torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype) for _ in range(copies)]
    hidden = torch.randn(t, h, generator=g).to(dtype)
    logits = torch.randn(t, e, generator=g)
    topk_weights, topk_ids = ops.topk_routing(logits, k)
    return hidden, w13s, w2s, topk_weights, topk_ids


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,2,4,8,32", help="comma-separated T values")
    p.add_argument("--shapes", default=None, help="comma-separated HxIxExK (default: two presets)")
    p.add_argument("--cold-mib", type=int, default=256,
                   help="cycle through weight copies totalling this much (beyond the L3 cache)")
    args = parse(p)
    shapes = ({s: tuple(map(int, s.split("x"))) for s in args.shapes.split(",")} if args.shapes
              else dict(SHAPES))
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        shapes, tokens = {"quick": (256, 192, 6, 2), "odd": (200, 72, 5, 5)}, [1, 9]
    args.repeats = args.repeats or (3 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    ceiling_bytes = 64 << 20 if args.quick else args.cold_mib << 20
    read_gbs, copy_gbs = read_bandwidth(ceiling_bytes), copy_bandwidth(ceiling_bytes)
    print(f"fused_moe {args.dtype} on {args.device} threads={torch.get_num_threads()}; read bandwidth "
          f"{read_gbs:.1f} GB/s, copy bandwidth {copy_gbs:.1f} GB/s (bytes = selected experts' "
          f"weights + hidden + out)")
    g = generator(0)
    for name, (h, i, e, k) in shapes.items():
        expert_bytes = 3 * h * i * torch.finfo(dtype).bits // 8
        copies = 1 if args.quick else max(1, -(-(args.cold_mib << 20) // (e * expert_bytes)))
        for t in tokens:
            hidden, w13s, w2s, tw, ti = _case(h, i, e, k, t, dtype, copies, g)
            prepared = [ops.prepare_moe_weights(a, b) for a, b in zip(w13s, w2s)]
            out = ops.fused_moe_prepared(hidden, prepared[0], tw, ti)
            exact = ops_native.fused_moe(hidden.double(), w13s[0].double(), w2s[0].double(), tw, ti)
            check(f"{name} T={t}", out, same_precision(hidden, w13s[0], w2s[0], tw, ti), exact)
            selected = ti.unique().numel()
            nbytes = selected * expert_bytes + 2 * hidden.numel() * hidden.element_size()
            flops = 2 * 3 * h * i * t * k
            state = {"c": 0}

            def nxt():
                state["c"] = (state["c"] + 1) % copies
                return state["c"]

            fns = {"octavo.fused_moe": lambda: ops.fused_moe_prepared(hidden, prepared[nxt()], tw, ti),
                   "torch loop (F.linear per expert)":
                       lambda: (lambda c: torch_loop(hidden, w13s[c], w2s[c], tw, ti))(nxt())}
            for label, fn in fns.items():
                report(f"{name} [{h}x{i}, {selected}/{e} experts] T={t} {label}",
                       time_fn(fn, args.repeats), nbytes, flops, read_gbs, copy_gbs)


if __name__ == "__main__":
    main()
