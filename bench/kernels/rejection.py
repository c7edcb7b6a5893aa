"""Kernel lab: rejection_sample (speculative decoding's accept / recover / bonus step).

python -m octavo.bench.kernels.rejection [--quick] [--batch 64 --drafts 4 --vocab 32000]
"""
import torch

from octavo import ops
from octavo.bench.kernels.common import copy_bandwidth, generator, parse, parser, report, time_fn
from octavo.spec_decode.rejection import PAD, rejection_sample


def make(b: int, k: int, v: int, greedy_frac: float, g: torch.Generator) -> dict:
    p = torch.softmax(torch.randn(b, k + 1, v, generator=g) * 3, dim=-1)
    q = torch.softmax(torch.randn(b, k, v, generator=g) * 3, dim=-1)
    # a draft that often agrees with the target, so rows run several positions deep
    drafts = torch.where(torch.rand(b, k, generator=g) < 0.7, p[:, :k].argmax(-1),
                         torch.randint(0, v, (b, k), generator=g))
    return dict(draft_token_ids=drafts, num_draft_tokens=torch.full((b,), k), draft_probs=q,
                target_probs=p, uniform=torch.rand(b, k, generator=g),
                exp_noise=torch.empty(b, k + 1, v).exponential_(generator=g),
                greedy=torch.rand(b, generator=g) < greedy_frac)


def bytes_read(case: dict, out: torch.Tensor) -> int:
    """Greedy rows read p at every position they reach; sampled rows read p, q and the noise in
    full only at their last position (an acceptance reads two numbers)."""
    v = case["target_probs"].shape[-1]
    reached = (out != PAD).sum(dim=1)
    greedy = case["greedy"]
    rows_q = 1 if case["draft_probs"] is not None else 0
    sampled = (~greedy).sum().item() * (2 + rows_q)
    return 4 * v * (reached[greedy].sum().item() + sampled)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--drafts", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    args = parse(p)
    if args.quick:
        args.batch, args.vocab = 8, 4099
    args.repeats = args.repeats or (5 if args.quick else 50)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    b, k, v = args.batch, args.drafts, args.vocab
    print(f"rejection_sample B={b} K={k} V={v}; copy bandwidth {copy_gbs:.1f} GB/s")
    g = generator()
    for name, greedy_frac, with_q in [("sampled, draft probs", 0.0, True),
                                      ("sampled, n-gram drafts", 0.0, False),
                                      ("greedy", 1.0, False)]:
        case = make(b, k, v, greedy_frac, g)
        if not with_q:
            case["draft_probs"] = None
        out = ops.rejection_sample(**case)
        ok = torch.equal(out, rejection_sample(**case))
        print(f"check rejection_sample ({name}): tokens equal the reference "
              f"{'OK' if ok else 'FAIL'}; mean emitted {(out != PAD).sum(1).float().mean():.2f}")
        if not ok:
            raise SystemExit(f"rejection_sample ({name}): kernel disagrees with the reference")
        report(f"rejection_sample ({name})",
               time_fn(lambda: ops.rejection_sample(**case), args.repeats),
               bytes_read(case, out), 0, copy_gbs)


if __name__ == "__main__":
    main()
