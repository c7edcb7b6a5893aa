"""Kernel lab: paged_attention on decode and prefill shapes.

python -m octavo.bench.kernels.paged_attention [--quick] [--batch 32 --context 1024 ...]
Checks the registered op against octavo.ops_native, then times it (median) and prints GB/s of
K/V + Q + O traffic beside this machine's copy bandwidth, and GFLOP/s.
--cold cycles through enough copies of the inputs that each call finds its KV cache out of the
last-level cache, as in the engine (where the other layers' caches and weights run in between);
without it a small decode batch is timed from L3.
--kv-cache-dtype fp8 stores K/V as kv_cache_dtype="fp8" does (float8_e4m3fn, one byte a value).
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse,
                                           parser, report, time_fn)


def make_inputs(q_lens, ctxs, num_heads, num_kv_heads, head_size, block_size, dtype, seed=0,
                kv_cache_dtype="auto"):
    g = generator(seed)
    blocks = [(c + block_size - 1) // block_size for c in ctxs]
    num_blocks, max_blocks = sum(blocks), max(blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=g).to(dtype)
    value_cache = torch.randn(shape, generator=g).to(dtype)
    if kv_cache_dtype == "fp8":
        key_cache, value_cache = (ops_native.fp8_kv_quantize(c) for c in (key_cache, value_cache))
    perm = torch.randperm(num_blocks, generator=g).int()
    block_table = torch.zeros(len(ctxs), max_blocks, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks):
        block_table[s, :nb] = perm[used:used + nb]
        used += nb
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=g).to(dtype)
    return dict(query=query, key_cache=key_cache, value_cache=value_cache, query_start_loc=qsl,
                seq_lens=torch.tensor(ctxs, dtype=torch.int32), block_table=block_table,
                scale=head_size ** -0.5)


def traffic(inp, q_lens, ctxs, sliding_window=0):
    """(bytes, flops) of one call: K/V of each attended key once per kv head, Q and O once."""
    q = inp["query"]
    _, hq, hd = q.shape
    hk = inp["key_cache"].shape[2]
    es, kv_es = q.element_size(), inp["key_cache"].element_size()
    kv_keys, qk_pairs = 0, 0
    for q_len, ctx in zip(q_lens, ctxs):
        lo = max(0, ctx - q_len - sliding_window + 1) if sliding_window else 0
        kv_keys += ctx - lo
        for i in range(q_len):
            p = ctx - q_len + i
            qk_pairs += p + 1 - (max(0, p - sliding_window + 1) if sliding_window else 0)
    nbytes = 2 * kv_keys * hk * hd * kv_es + 2 * q.numel() * es
    return nbytes, 4 * qk_pairs * hq * hd


COLD_BYTES = 256 << 20  # well above the L3 of the machines this runs on


def cold_copies(inp, cold):
    """How many independent input sets to cycle through so the caches are cold on each call."""
    if not cold:
        return 1
    nbytes = sum(inp[k].numel() * inp[k].element_size() for k in ("key_cache", "value_cache"))
    return max(2, -(-COLD_BYTES // nbytes))


def run_case(name, q_lens, ctxs, args, copy_gbs, check_ref=True, **kw):
    dtype = getattr(torch, args.dtype)
    inp = make_inputs(q_lens, ctxs, args.heads, args.kv_heads, args.head_size, args.block_size, dtype,
                      kv_cache_dtype=args.kv_cache_dtype)
    out = torch.empty_like(inp["query"])
    copies = [inp] + [make_inputs(q_lens, ctxs, args.heads, args.kv_heads, args.head_size,
                                  args.block_size, dtype, seed=i, kv_cache_dtype=args.kv_cache_dtype)
                      for i in range(1, cold_copies(inp, args.cold))]
    calls = iter(range(1 << 62))
    if check_ref:
        ops.paged_attention(**inp, out=out, **kw)
        exact = ops_native.paged_attention(**{**inp, **{k: inp[k].double() for k in
                                                         ("query", "key_cache", "value_cache")}}, **kw)
        check(name, out, ops_native.paged_attention(**inp, **kw), exact)
    seconds = time_fn(lambda: ops.paged_attention(**copies[next(calls) % len(copies)], out=out, **kw),
                      args.repeats)
    report(name + (" cold" if args.cold else ""), seconds, *traffic(inp, q_lens, ctxs, kw.get("sliding_window", 0)), copy_gbs)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="decode batch size")
    p.add_argument("--context", type=int, default=1024, help="max decode context (mixed lengths)")
    p.add_argument("--prefill", type=int, default=1024,
                   help="prefill prompt length (0: the decode cases only)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-seqs", type=int, default=1,
                   help="also time this many prompts of --prefill tokens in one call (if > 1)")
    p.add_argument("--cold", action="store_true", help="KV caches out of the LLC on every call")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: K/V stored as float8_e4m3fn (kv_cache_dtype='fp8')")
    args = parse(p)
    if args.prefill < 0 or args.batch < 1:
        raise SystemExit("--prefill must be >= 0 and --batch >= 1")
    if args.quick:
        args.batch, args.context, args.prefill = 8, 256, 128
    args.repeats = args.repeats or (3 if args.quick else 10)
    print(f"paged_attention {args.dtype} kv_cache={args.kv_cache_dtype} Hq={args.heads} Hk={args.kv_heads} hd={args.head_size} "
          f"block={args.block_size} threads={torch.get_num_threads()}")
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s")
    ctx_full = [args.context] * args.batch
    ctx_mixed = [max(1, args.context * (i + 1) // args.batch) for i in range(args.batch)]
    run_case(f"decode b={args.batch} ctx={args.context}", [1] * args.batch, ctx_full, args, copy_gbs)
    run_case(f"decode b={args.batch} ctx=mixed<={args.context}", [1] * args.batch, ctx_mixed, args, copy_gbs)
    if args.prefill == 0:
        return
    run_case(f"prefill 1x{args.prefill}", [args.prefill], [args.prefill], args, copy_gbs)
    if args.prefill_seqs > 1:
        n = args.prefill_seqs
        run_case(f"prefill {n}x{args.prefill}", [args.prefill] * n, [args.prefill] * n, args, copy_gbs)
    half = args.prefill // 2
    decodes = ctx_mixed[:7]  # fewer when --batch < 7
    run_case(f"chunked prefill {half} on {args.prefill} + decodes", [half] + [1] * len(decodes),
             [args.prefill] + decodes, args, copy_gbs)


if __name__ == "__main__":
    main()
