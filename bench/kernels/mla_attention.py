"""Kernel lab: mla_paged_attention (MLA over the paged latent cache) on decode and prefill shapes.

python -m octavo.bench.kernels.mla_attention [--quick] [--batch 8 --context 1024 --heads 16 ...]
Checks the registered op against octavo.ops_native, then times it (median) and prints GB/s of
latent cache + Q + O traffic (each latent row read once for all heads) beside this machine's
copy bandwidth, and GFLOP/s (L+R multiply-adds per score, L per value, per head).
Defaults: DeepSeek-V2-Lite's 16 heads, kv_lora_rank 512, rope 64.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import (check, copy_bandwidth, generator, parse, parser, report,
                                         time_fn)


def make_inputs(q_lens, ctxs, heads, lora, rope, block_size, dtype, seed=0):
    g = generator(seed)
    blocks = [(c + block_size - 1) // block_size for c in ctxs]
    num_blocks, max_blocks = sum(blocks), max(blocks)
    kv_cache = torch.randn(num_blocks, block_size, lora + rope, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).int()
    block_table = torch.zeros(len(ctxs), max_blocks, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks):
        block_table[s, :nb] = perm[used:used + nb]
        used += nb
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, lora + rope, generator=g).to(dtype)
    return dict(q=q, kv_cache=kv_cache, query_start_loc=qsl,
                seq_lens=torch.tensor(ctxs, dtype=torch.int32), block_table=block_table,
                scale=(lora + rope) ** -0.5, kv_lora_rank=lora)


def traffic(inp, q_lens, ctxs):
    """(bytes, flops) of one call: each sequence's latent rows once, Q and O once."""
    q = inp["q"]
    _, heads, width = q.shape
    lora, es = inp["kv_lora_rank"], q.element_size()
    pairs = sum(ctx - q_len + i + 1 for q_len, ctx in zip(q_lens, ctxs) for i in range(q_len))
    nbytes = sum(ctxs) * width * es + q.numel() * es + q.shape[0] * heads * lora * es
    return nbytes, 2 * pairs * heads * (width + lora)


def run_case(name, q_lens, ctxs, args, copy_gbs):
    dtype = getattr(torch, args.dtype)
    inp = make_inputs(q_lens, ctxs, args.heads, args.lora, args.rope, args.block_size, dtype)
    exact = ops_native.mla_paged_attention(**{**inp, "q": inp["q"].double(),
                                              "kv_cache": inp["kv_cache"].double()})
    check(name, ops.mla_paged_attention(**inp), ops_native.mla_paged_attention(**inp), exact)
    seconds = time_fn(lambda: ops.mla_paged_attention(**inp), args.repeats)
    report(name, seconds, *traffic(inp, q_lens, ctxs), copy_gbs)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="decode batch size")
    p.add_argument("--context", type=int, default=1024, help="decode context")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--lora", type=int, default=512, help="kv_lora_rank")
    p.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim")
    p.add_argument("--block-size", type=int, default=16)
    args = parse(p)
    if args.quick:
        args.batch, args.context, args.prefill = 4, 128, 64
    args.repeats = args.repeats or (3 if args.quick else 10)
    print(f"mla_paged_attention {args.dtype} H={args.heads} L={args.lora} R={args.rope} "
          f"block={args.block_size} threads={torch.get_num_threads()}")
    copy_gbs = copy_bandwidth(64 << 20 if args.quick else 256 << 20)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s")
    run_case(f"decode b={args.batch} ctx={args.context}", [1] * args.batch,
             [args.context] * args.batch, args, copy_gbs)
    run_case(f"prefill 1x{args.prefill}", [args.prefill], [args.prefill], args, copy_gbs)
    half = args.prefill // 2
    run_case(f"chunked prefill {half} on {args.prefill} + decodes", [half] + [1] * 3,
             [args.prefill] + [args.context] * 3, args, copy_gbs)


if __name__ == "__main__":
    main()
