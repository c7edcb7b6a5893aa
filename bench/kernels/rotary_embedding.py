"""Kernel lab: rotary_embedding (neox and GPT-J styles) in place on query and key.

python -m octavo.bench.kernels.rotary_embedding [--quick] [--tokens 256 --heads 32 --kv-heads 8]
Checks the registered op against octavo.ops_native, then times it (median) and prints GB/s of
Q and K read + written (plus the cos/sin rows used) beside this machine's copy bandwidth.
"""
import torch

from octavo import ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse,
                                           parser, report, time_fn)


def cos_sin_cache(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)        # [max_pos, rot_dim]


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--max-pos", type=int, default=4096)
    args = parse(p)
    if args.quick:
        args.tokens, args.heads, args.kv_heads, args.max_pos = 32, 8, 2, 256
    args.repeats = args.repeats or (5 if args.quick else 50)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    hd = args.head_size
    print(f"rotary_embedding {args.dtype} T={args.tokens} Hq={args.heads} Hk={args.kv_heads} "
          f"hd={hd}; copy bandwidth {copy_gbs:.1f} GB/s")
    g = generator(0)
    positions = torch.randint(0, args.max_pos, (args.tokens,), generator=g)
    q = torch.randn(args.tokens, args.heads * hd, generator=g).to(dtype)    # [T, Hq*hd]
    k = torch.randn(args.tokens, args.kv_heads * hd, generator=g).to(dtype)  # [T, Hk*hd]
    cache64 = cos_sin_cache(args.max_pos, hd)
    cache = cache64.to(dtype)
    es = q.element_size()
    nbytes = 2 * (q.numel() + k.numel()) * es + args.tokens * hd * es
    flops = 3 * (q.numel() + k.numel())
    for is_neox in (True, False):
        name = f"rotary {'neox' if is_neox else 'gptj'}"
        qk, kk = q.clone(), k.clone()
        torch.ops.octavo.rotary_embedding(positions, qk, kk, hd, cache, is_neox)
        qn, kn = q.clone(), k.clone()
        ops_native.rotary_embedding(positions, qn, kn, hd, cache, is_neox)
        qe, ke = q.double(), k.double()
        ops_native.rotary_embedding(positions, qe, ke, hd, cache64, is_neox)
        check(f"{name} query", qk, qn, qe)
        check(f"{name} key", kk, kn, ke)
        # in place: repeated rotations keep the values' magnitude, so timing the same buffers is fine
        t = time_fn(lambda: torch.ops.octavo.rotary_embedding(positions, qk, kk, hd, cache, is_neox),
                    args.repeats)
        report(name, t, nbytes, flops, copy_gbs)


if __name__ == "__main__":
    main()
