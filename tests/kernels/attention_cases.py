"""Random paged-attention batches shared by the tests and the kernel lab."""
import torch

# masking / scoring options every paged-attention backend is tested with ("alibi": pass slopes)
VARIANTS = [dict(sliding_window=20), dict(sliding_window=1), dict(sliding_window=700),
            dict(soft_cap=5.0), dict(alibi=True), dict(sliding_window=33, soft_cap=30.0, alibi=True)]
VARIANT_IDS = ["window20", "window1", "window700", "softcap", "alibi", "all"]


def make_batch(seqs, num_heads, num_kv_heads, head_size, block_size, dtype, seed=0,
               fill_unused=float("nan")):
    """seqs: list of (q_len, seq_len). Returns the kwargs of paged_attention (caches hold random
    K/V for every context token, `fill_unused` everywhere else, blocks in a shuffled order)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(ctx + block_size - 1) // block_size for _, ctx in seqs]
    max_blocks = max(blocks_per_seq + [1])
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(shape, fill_unused, dtype=dtype)
    value_cache = torch.full(shape, fill_unused, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    used = 0
    for s, (_, ctx) in enumerate(seqs):
        nb = blocks_per_seq[s]
        block_table[s, :nb] = perm[used:used + nb].int()
        used += nb
        for j in range(ctx):
            b, o = block_table[s, j // block_size], j % block_size
            key_cache[b, o] = torch.randn(num_kv_heads, head_size, generator=g).to(dtype)
            value_cache[b, o] = torch.randn(num_kv_heads, head_size, generator=g).to(dtype)
    q_lens = [q for q, _ in seqs]
    query_start_loc = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=g).to(dtype)
    return dict(query=query, key_cache=key_cache, value_cache=value_cache,
                query_start_loc=query_start_loc,
                seq_lens=torch.tensor([c for _, c in seqs], dtype=torch.int32),
                block_table=block_table, scale=head_size ** -0.5)


def to_dtype(batch, dtype):
    out = dict(batch)
    for k in ("query", "key_cache", "value_cache"):
        out[k] = batch[k].to(dtype)
    return out


def check_graph_decode(batch):
    """(CUDA) The decode path launches by shapes only: paged_attention captured once in a CUDA graph
    and replayed with new seq_lens matches octavo.ops_native on the new lengths."""
    from octavo import ops, ops_native
    out = torch.empty_like(batch["query"])
    ops.paged_attention(**batch, out=out)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention(**batch, out=out)
    for lens in ([1500, 900, 20], [3, 1200, 700]):
        batch["seq_lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ops_native.paged_attention(**batch), rtol=2e-2, atol=2e-2)
