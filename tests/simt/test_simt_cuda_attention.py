"""paged_attention CUDA kernels (split-context decode + merge, tiled prefill) under the SIMT
emulator vs octavo.ops_native (tolerance rule of tests/kernels). Shapes are small but span
several blocks, partial KV blocks, several 512-key partitions and every GQA layout."""
import pytest
import torch

import simt_ext
from attention_cases import VARIANT_IDS, VARIANTS, make_batch, to_dtype
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops_native

# one query row per sequence (the decode kernels); 1100 keys span three partitions of 512
DECODE = [(1, 1), (1, 1100), (1, 37), (1, 600)]
# varlen batch (the prefill kernel): decode rows, a cached prefix (q_len < seq_len), a full
# prefill longer than one 16-row tile, an empty sequence
MIXED = [(1, 1), (1, 37), (19, 19), (5, 70), (0, 9), (3, 3)]
HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # GQA ratios 1, 2, 4 and MQA


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def alibi(num_heads):
    return torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])


def check(simt, batch, dtype, sliding_window=0, soft_cap=0.0, alibi_slopes=None):
    b = to_dtype(batch, dtype)
    kw = dict(sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes)
    out = torch.full_like(b["query"], float("nan"))
    simt.paged_attention(out, b["query"], b["key_cache"], b["value_cache"], b["query_start_loc"],
                         b["seq_lens"], b["block_table"], b["scale"], sliding_window, soft_cap,
                         alibi_slopes)
    native = ops_native.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**to_dtype(b, torch.float64), **kw)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, native, exact, what=f"paged_attention {dtype} {kw}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_decode_split_context(simt, dtype, num_heads, num_kv_heads):
    batch = make_batch(DECODE, num_heads, num_kv_heads, 64, 16, torch.float32, seed=num_heads + num_kv_heads)
    check(simt, batch, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_prefill_mixed(simt, dtype, num_heads, num_kv_heads):
    batch = make_batch(MIXED, num_heads, num_kv_heads, 64, 7, torch.float32, seed=num_heads * num_kv_heads)
    check(simt, batch, dtype)


@pytest.mark.parametrize("head_size", [8, 32, 40, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [5, 16])
def test_head_sizes(simt, head_size, block_size):
    for seqs in ([(1, 13), (1, 530), (1, 3)], [(1, 13), (6, 40), (2, 2)]):
        check(simt, make_batch(seqs, 4, 2, head_size, block_size, torch.float32, seed=head_size), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [1, 3, 33])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
def test_awkward_block_sizes(simt, dtype, block_size, seqs):
    check(simt, make_batch(seqs, 4, 2, 32, block_size, torch.float32, seed=block_size), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_variants(simt, dtype, seqs, variant):
    num_heads, num_kv_heads = 4, 2
    batch = make_batch(seqs, num_heads, num_kv_heads, 32, 16, torch.float32, seed=3)
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = alibi(num_heads)
    check(simt, batch, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=1500, soft_cap=30.0)])
def test_decode_long_partitions(simt, dtype, kw):
    # a block table wide enough for 33600 keys: the 64 partitions at most become 33 of 1024 keys,
    # each scored in two 512-key chunks (online softmax within the block, then the merge)
    batch = make_batch([(1, 3000), (1, 40), (1, 1700)], 4, 2, 32, 16, torch.float32, seed=8)
    table = batch["block_table"]
    batch["block_table"] = torch.cat([table, torch.zeros(3, 2100 - table.shape[1], dtype=torch.int32)], 1)
    check(simt, batch, dtype, **kw)


def test_decode_big_batch_unsplit(simt):
    # 32 heads x 64 sequences fill the GPU: no split, one block scores a whole 1100-key context
    # in three chunks and writes the output itself
    seqs = [(1, 1100)] + [(1, 1 + (13 * i) % 90) for i in range(63)]
    check(simt, make_batch(seqs, 32, 8, 32, 16, torch.float32, seed=12), torch.bfloat16, sliding_window=1050)


def test_one_row_per_sequence_but_not_decode(simt):
    # T == S takes the decode kernels even when one sequence has two rows and another none
    batch = make_batch([(2, 600), (0, 9), (1, 30)], 4, 2, 32, 16, torch.float32, seed=4)
    check(simt, batch, torch.float32, sliding_window=550)


def test_untouched_rows_and_strided_query(simt):
    # rows past query_start_loc[-1] are left alone; the query may be a strided view
    batch = make_batch([(3, 20), (1, 520)], 4, 2, 32, 8, torch.float32, seed=6)
    qkv = torch.randn(6, 8, 32)
    qkv[:4, :4] = batch["query"]
    q = qkv[:, :4]
    out = torch.full((6, 4, 32), 7.0)
    simt.paged_attention(out, q, batch["key_cache"], batch["value_cache"], batch["query_start_loc"],
                         batch["seq_lens"], batch["block_table"], batch["scale"], 0, 0.0, None)
    torch.testing.assert_close(out[:4], ops_native.paged_attention(**batch), rtol=1e-5, atol=1e-5)
    assert (out[4:] == 7.0).all()


def test_errors(simt):
    b = make_batch([(2, 5), (1, 20)], 4, 2, 32, 16, torch.float32, fill_unused=0.0)

    def call(**over):
        c = {**b, **over}
        simt.paged_attention(torch.empty_like(c["query"]), c["query"], c["key_cache"], c["value_cache"],
                             c["query_start_loc"], c["seq_lens"], c["block_table"], c["scale"], 0, 0.0, None)

    with pytest.raises(RuntimeError, match="head size must be a multiple of 8"):
        call(query=torch.randn(3, 4, 12), key_cache=torch.zeros(4, 16, 2, 12), value_cache=torch.zeros(4, 16, 2, 12))
    with pytest.raises(RuntimeError, match="int32"):
        call(seq_lens=b["seq_lens"].long())
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        call(**to_dtype(b, torch.float64))
    with pytest.raises(RuntimeError, match=r"paged_prefill_kernel.*seq_len <= max_blocks \* block_size"):
        call(seq_lens=torch.tensor([5, 40], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"paged_decode_kernel.*block_table entry out of range"):
        bad = b["block_table"].clone()
        bad[0, 0] = 99
        call(query=b["query"][:2], query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32), block_table=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("variant", [{}, dict(sliding_window=45, soft_cap=20.0, alibi=True)],
                         ids=["plain", "all"])
def test_prefill_mma_tiles(simt, dtype, head_size, variant):
    # the tensor-core prefill (attention_prefill.cuh): several 64-row query tiles per sequence
    # (G = 4 query heads packed per kv head), a cached prefix over several 64-key tiles
    num_heads, num_kv_heads = 8, 2
    batch = make_batch([(70, 200), (1, 9), (33, 33)], num_heads, num_kv_heads, head_size, 7,
                       torch.float32, seed=head_size)
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = alibi(num_heads)
    check(simt, batch, dtype, **kw)
