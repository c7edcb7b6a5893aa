"""Kernel lab: gated delta rule (Kimi-Linear KDA) prefill and decode vs transformers' torch path.

python -m octavo.bench.kernels.gated_delta_rule [--quick] [--tokens 256,1024] [--batch 1,32]
Shapes are H x K x V. GB/s counts q, k, v, g, beta and out once plus the fp32 state slots read
and written; FLOP/s counts 4 multiply-adds per state element and token (decay + k^T S, update +
q^T S). Beside octavo: transformers' chunk_kimi_delta_attention (prefill) and
recurrent_kimi_delta_attention (decode), the Kimi-Linear torch fallbacks, when installed.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)

SHAPES = {"kimi-linear-48b": (32, 128, 128)}  # linear-attention heads of Kimi-Linear-48B-A3B


def _transformers():
    try:
        from transformers.models.kimi_linear import modeling_kimi_linear as km
    except ImportError:
        return None
    return km


def _inputs(seq_lens, h, kd, vd, dtype, gen):
    t = sum(seq_lens)
    q, k = (torch.randn(t, h, kd, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(t, h, vd, generator=gen).to(dtype)
    g = -torch.rand(t, h, kd, generator=gen) * 0.1
    beta = torch.rand(t, h, generator=gen).to(dtype)
    states = torch.randn(len(seq_lens), h, kd, vd, generator=gen) * 0.1
    qsl = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k, v, g, beta, states, qsl, torch.arange(len(seq_lens), dtype=torch.int32)


def _cost(t, b, h, kd, vd, dtype):
    act = torch.finfo(dtype).bits // 8
    nbytes = act * t * h * (2 * kd + 2 * vd + 1) + 4 * t * h * kd + 2 * 4 * b * h * kd * vd
    return nbytes, 8 * t * h * kd * vd


def run_case(name, h, kd, vd, seq_lens, dtype, args, copy_gbs, gen, km):
    q, k, v, g, beta, states, qsl, idx = _inputs(seq_lens, h, kd, vd, dtype, gen)
    decode = len(seq_lens) > 1 or seq_lens[0] == 1

    def run(st, native=False, cast=None):
        qq, kk, vv, gg, bb = (x if cast is None else x.to(cast) for x in (q, k, v, g, beta))
        mod = ops_native if native else ops
        if decode:
            return mod.gated_delta_rule_update(st, qq, kk, vv, gg, bb, idx)
        return mod.gated_delta_rule(qq, kk, vv, gg, bb, st, qsl, idx)

    what = f"B={len(seq_lens)}" if decode else f"T={seq_lens[0]}"
    out = run(states.clone())
    check(f"{name} {what}", out, run(states.clone(), True), run(states.double(), True, torch.float64))
    nbytes, flops = _cost(sum(seq_lens), len(seq_lens), h, kd, vd, dtype)
    st = states.clone()
    fns = {"octavo.gated_delta_rule" + ("_update" if decode else ""): lambda: run(st)}
    if km is not None:
        b5 = (x[None] if not decode else x[:, None] for x in (q, k, v, g, beta))
        qb, kb, vb, gb, bb = list(b5)
        if decode:
            fns["transformers recurrent_kimi_delta_attention"] = lambda: \
                km.recurrent_kimi_delta_attention(qb, kb, vb, gb, bb, states, True,
                                                  use_qk_l2norm_in_kernel=True)
        else:
            fns["transformers chunk_kimi_delta_attention"] = lambda: km.chunk_kimi_delta_attention(
                qb, kb, vb, gb, bb, initial_state=states, output_final_state=True,
                use_qk_l2norm_in_kernel=True)
    for label, fn in fns.items():
        report(f"{name} {'decode' if decode else 'prefill'} {what} {label}",
               time_fn(fn, args.repeats), nbytes, flops, copy_gbs)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,1024", help="prefill lengths T")
    p.add_argument("--batch", default="1,32", help="decode batch sizes")
    args = parse(p)
    shapes, tokens = dict(SHAPES), [int(t) for t in args.tokens.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if args.quick:
        shapes, tokens, batches = {"quick": (2, 16, 24), "odd": (3, 13, 7)}, [29], [1, 4]
    args.repeats = args.repeats or (3 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    km = _transformers()
    print(f"gated_delta_rule {args.dtype} on {args.device} threads={torch.get_num_threads()}; copy "
          f"bandwidth {copy_gbs:.1f} GB/s (bytes = q, k, v, g, beta, out + fp32 states r/w)")
    gen = generator(0)
    for name, (h, kd, vd) in shapes.items():
        for t in tokens:
            run_case(name, h, kd, vd, [t], dtype, args, copy_gbs, gen, km)
        for b in batches:
            run_case(name, h, kd, vd, [1] * b, dtype, args, copy_gbs, gen, km)


if __name__ == "__main__":
    main()
