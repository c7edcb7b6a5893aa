"""Kernel lab: lora_shrink and lora_expand (a batch whose rows use different adapter slots).

python -m octavo.bench.kernels.lora [--quick] [--tokens 64 --hidden 4096 --rank 16 --slots 4]
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=4)
    args = parse(p)
    if args.quick:
        args.tokens, args.hidden = 16, 512
    args.repeats = args.repeats or (5 if args.quick else 50)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    t, h, r, slots = args.tokens, args.hidden, args.rank, args.slots
    print(f"lora {args.dtype} T={t} H={h} R={r} slots={slots}; copy bandwidth {copy_gbs:.1f} GB/s")
    g = generator()
    x = torch.randn(t, h, generator=g).to(dtype)
    a = (torch.randn(slots, r, h, generator=g) / h ** 0.5).to(dtype)
    b = (torch.randn(slots, h, r, generator=g) / r ** 0.5).to(dtype)
    idx = torch.randint(-1, slots, (t,), generator=g)
    s = ops.lora_shrink(x, a, idx)
    check("lora_shrink", s, ops_native.lora_shrink(x, a, idx),
          ops_native.lora_shrink(x.double(), a.double(), idx))
    # bytes: each used slot's weights once (they stay in cache across its rows) plus x and out
    used = len(set(idx.tolist()) - {-1})
    nbytes = used * r * h * a.element_size() + x.numel() * x.element_size() + s.numel() * 4
    flops = 2 * t * r * h
    report("lora_shrink", time_fn(lambda: ops.lora_shrink(x, a, idx), args.repeats), nbytes,
           flops, copy_gbs)
    report("lora_shrink (ops_native, for scale)",
           time_fn(lambda: ops_native.lora_shrink(x, a, idx), args.repeats), nbytes, flops, copy_gbs)
    out = torch.randn(t, h, generator=g).to(dtype)
    native, exact = out.clone(), out.double()
    ops_native.lora_expand(native, s, b, idx)
    ops_native.lora_expand(exact, s, b.double(), idx)
    kernel = out.clone()
    ops.lora_expand(kernel, s, b, idx)
    check("lora_expand", kernel, native, exact)
    nbytes = used * r * h * b.element_size() + 2 * out.numel() * out.element_size()
    report("lora_expand", time_fn(lambda: ops.lora_expand(kernel, s, b, idx), args.repeats),
           nbytes, flops, copy_gbs)
    report("lora_expand (ops_native, for scale)",
           time_fn(lambda: ops_native.lora_expand(native, s, b, idx), args.repeats), nbytes, flops,
           copy_gbs)


if __name__ == "__main__":
    main()
