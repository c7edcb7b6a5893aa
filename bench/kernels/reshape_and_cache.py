"""Kernel lab: reshape_and_cache (write new K/V rows into the paged cache).

python -m octavo.bench.kernels.reshape_and_cache [--quick] [--tokens 256 --kv-heads 8 ...]
Checks the registered op against octavo.ops_native (the cache contents must match exactly: it is
a copy), then times it (median) and prints GB/s of K/V read + written beside the copy bandwidth.
"""
import torch

from octavo import ops_native
from octavo.bench.kernels.common import copy_bandwidth, generator, parse, parser, report, time_fn


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=4096)
    args = parse(p)
    if args.quick:
        args.tokens, args.kv_heads, args.num_blocks = 32, 2, 64
    args.repeats = args.repeats or (5 if args.quick else 50)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"reshape_and_cache {args.dtype} T={args.tokens} Hk={args.kv_heads} hd={args.head_size} "
          f"block={args.block_size}; copy bandwidth {copy_gbs:.1f} GB/s")
    g = generator(0)
    shape = (args.num_blocks, args.block_size, args.kv_heads, args.head_size)
    key = torch.randn(args.tokens, args.kv_heads, args.head_size, generator=g).to(dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(args.num_blocks * args.block_size, generator=g)[:args.tokens]
    for name, slot_mapping in (("scattered slots", slots),
                               ("contiguous slots", torch.arange(args.tokens))):
        kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        torch.ops.octavo.reshape_and_cache(key, value, kc, vc, slot_mapping)
        kn, vn = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        ops_native.reshape_and_cache(key, value, kn, vn, slot_mapping)
        ok = torch.equal(kc, kn) and torch.equal(vc, vn)
        print(f"check reshape_and_cache {name}: {'OK' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit(f"reshape_and_cache {name}: cache differs from the reference")
        nbytes = 4 * key.numel() * key.element_size()          # K and V, read + written
        t = time_fn(lambda: torch.ops.octavo.reshape_and_cache(key, value, kc, vc, slot_mapping),
                    args.repeats)
        report(f"reshape_and_cache {name}", t, nbytes, 0, copy_gbs)


if __name__ == "__main__":
    main()
