"""CUDA kernels (rms_norm, fused_add_rms_norm, silu/gelu_and_mul, rotary_embedding,
reshape_and_cache, paged_attention, topk_routing, moe_align, fused_moe) vs octavo.ops_native on a GPU. Skipped where torch.cuda is unavailable; the
same kernels run under the SIMT emulator on the CPU in tests/simt."""
import pytest
import torch

from attention_cases import VARIANT_IDS, VARIANTS, check_graph_decode, make_batch, to_dtype
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 769), (33, 4096), (5, 5125)])
def test_rms_norms_cuda(dtype, num_tokens, hidden):
    torch.manual_seed(0)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.rand(hidden, dtype=dtype, device="cuda") + 0.5
    assert_close_to_ref(ops.rms_norm(x, w, 1e-6), ops_native.rms_norm(x, w, 1e-6),
                        ops_native.rms_norm(x.double(), w.double(), 1e-6))
    xk, rk, xn, rn, xe, re = x.clone(), r.clone(), x.clone(), r.clone(), x.double(), r.double()
    ops.fused_add_rms_norm(xk, rk, w, 1e-6)
    ops_native.fused_add_rms_norm(xn, rn, w, 1e-6)
    ops_native.fused_add_rms_norm(xe, re, w.double(), 1e-6)
    assert_close_to_ref(rk, rn, re)
    assert_close_to_ref(xk, xn, xe)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [1, 769, 2816])
def test_act_and_mul_cuda(dtype, d):
    x = torch.randn(9, 2 * d, dtype=dtype, device="cuda") * 3
    assert_close_to_ref(ops.silu_and_mul(x), ops_native.silu_and_mul(x), ops_native.silu_and_mul(x.double()))
    for approx in ("none", "tanh"):
        assert_close_to_ref(ops.gelu_and_mul(x, approx), ops_native.gelu_and_mul(x, approx),
                            ops_native.gelu_and_mul(x.double(), approx))


def test_opcheck_cuda():
    x = torch.randn(5, 96, device="cuda")
    w = torch.randn(96, device="cuda")
    torch.library.opcheck(torch.ops.octavo.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.octavo.silu_and_mul.default, (torch.empty(5, 48, device="cuda"), x))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (80, 20), (128, 64)])
def test_rotary_cuda(dtype, is_neox, head_size, rot_dim):
    torch.manual_seed(0)
    num_tokens, hq, hk, max_pos = 13, 8, 2, 500
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().cuda()
    positions = torch.randint(0, max_pos, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_size, dtype=dtype, device="cuda")
    split = (hq * head_size, hk * head_size, hk * head_size)
    outs = []
    for mod, buf in ((ops, qkv.clone()), (ops_native, qkv.clone()), (ops_native, qkv.double())):
        q, k, _ = buf.split(split, dim=1)
        mod.rotary_embedding(positions, q, k, head_size, cache, is_neox)
        outs.append(buf)
    assert_close_to_ref(outs[0], outs[1], outs[2])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_reshape_and_cache_cuda(dtype):
    torch.manual_seed(0)
    num_tokens, hk, hd, block_size, num_blocks = 11, 3, 40, 4, 12
    kv = torch.randn(num_tokens, 2, hk, hd, dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::4] = -1
    caches = [torch.randn(num_blocks, block_size, hk, hd, dtype=dtype, device="cuda") for _ in range(2)]
    ref = [c.clone() for c in caches]
    ops.reshape_and_cache(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    ops_native.reshape_and_cache(kv[:, 0], kv[:, 1], ref[0], ref[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


# paged_attention: the cases of tests/simt/test_simt_cuda_attention.py, plus bigger ones
ATTN_DECODE = [(1, 1), (1, 1100), (1, 37), (1, 600)]
ATTN_MIXED = [(1, 1), (1, 37), (19, 19), (5, 70), (0, 9), (3, 3)]
ATTN_HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]


def attn_check(batch, dtype, sliding_window=0, soft_cap=0.0, alibi_slopes=None):
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in to_dtype(batch, dtype).items()}
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.cuda()
    kw = dict(sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes)
    out = ops.paged_attention(**b, **kw)
    native = ops_native.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**to_dtype(b, torch.float64), **kw)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, native, exact, what=f"paged_attention {dtype} {kw}")


def attn_alibi(num_heads):
    return torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [ATTN_DECODE, ATTN_MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("num_heads,num_kv_heads", ATTN_HEADS)
@pytest.mark.parametrize("block_size", [7, 16])
def test_paged_attention_cuda(dtype, seqs, num_heads, num_kv_heads, block_size):
    attn_check(make_batch(seqs, num_heads, num_kv_heads, 64, block_size, torch.float32, seed=num_heads), dtype)


@pytest.mark.parametrize("head_size", [8, 32, 40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("seqs", [[(1, 13), (1, 530), (1, 3)], [(1, 13), (6, 40), (2, 2), (70, 700)]],
                         ids=["decode", "mixed"])
def test_paged_attention_cuda_head_sizes(head_size, seqs):
    for dtype in ALL_DTYPES:
        attn_check(make_batch(seqs, 4, 2, head_size, 5, torch.float32, seed=head_size), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [ATTN_DECODE, ATTN_MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_paged_attention_cuda_variants(dtype, seqs, variant):
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = attn_alibi(8)
    attn_check(make_batch(seqs, 8, 2, 128, 16, torch.float32, seed=3), dtype, **kw)


def test_paged_attention_cuda_large():
    # long decode contexts (many partitions) and a long prefill with a cached prefix
    decode = [(1, c) for c in (1, 7000, 33, 2500, 512, 64, 9999, 17)]
    attn_check(make_batch(decode, 32, 8, 128, 16, torch.float32, seed=9), torch.bfloat16)
    attn_check(make_batch([(300, 300), (129, 2000), (1, 40)], 16, 4, 128, 16, torch.float32, seed=11),
               torch.float16, sliding_window=500)
    # a batch big enough not to split: one block per (head, sequence) over up to ten chunks
    big = [(1, 5000)] + [(1, 1 + (37 * i) % 700) for i in range(127)]
    attn_check(make_batch(big, 32, 8, 128, 16, torch.float32, seed=10), torch.bfloat16)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_paged_attention_cuda_long_partitions(dtype):
    # a block table for 67200 keys: 44 partitions of 1536 keys, each scored in three chunks
    batch = make_batch([(1, 20000), (1, 40), (1, 3100)], 8, 2, 128, 16, torch.float32, seed=8)
    table = batch["block_table"]
    batch["block_table"] = torch.cat([table, torch.zeros(3, 4200 - table.shape[1], dtype=torch.int32)], 1)
    attn_check(batch, dtype)
    attn_check(batch, dtype, sliding_window=2000, soft_cap=30.0, alibi_slopes=attn_alibi(8))


def test_paged_attention_cuda_graph_decode():
    # the decode path launches by shapes only: a captured graph replays with new seq_lens
    b = {k: v.cuda() if torch.is_tensor(v) else v
         for k, v in to_dtype(make_batch([(1, 1500), (1, 900), (1, 20)], 8, 2, 64, 16, torch.float32,
                                         seed=2, fill_unused=0.0), torch.bfloat16).items()}
    check_graph_decode(b)


def test_paged_attention_cuda_opcheck_and_errors():
    b = {k: v.cuda() if torch.is_tensor(v) else v
         for k, v in make_batch([(2, 5), (1, 20)], 4, 2, 32, 16, torch.float32, fill_unused=0.0).items()}
    args = (torch.empty_like(b["query"]), b["query"], b["key_cache"], b["value_cache"],
            b["query_start_loc"], b["seq_lens"], b["block_table"], b["scale"], 3, 10.0,
            torch.rand(4, device="cuda"))
    torch.library.opcheck(torch.ops.octavo.paged_attention.default, args)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.paged_attention(**{**b, "seq_lens": b["seq_lens"].cpu()})
    with pytest.raises(RuntimeError, match="head size must be a multiple of 8"):
        ops.paged_attention(**{**b, "query": torch.randn(3, 4, 12, device="cuda"),
                               "key_cache": torch.zeros(4, 16, 2, 12, device="cuda"),
                               "value_cache": torch.zeros(4, 16, 2, 12, device="cuda")})


# ---- mixture of experts (the shared cases of tests/kernels/test_moe.py) ----

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", range(6))
def test_topk_routing_cuda(dtype, case):
    from test_moe import ROUTING_CASES
    kw = dict(ROUTING_CASES[case])
    g = torch.Generator().manual_seed(case)
    if kw.pop("bias", False):
        kw["bias"] = (torch.randn(12, generator=g) * 0.2).cuda()
    logits = (torch.randn(300, 12, generator=g) * 2).to(dtype)
    w, ids = ops.topk_routing(logits.cuda(), **kw)
    ref_w, ref_ids = ops_native.topk_routing(logits, **{k: v.cpu() if torch.is_tensor(v) else v
                                                        for k, v in kw.items()})
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,k,e,block", [(1, 1, 4, 16), (13, 2, 5, 4), (4096, 8, 256, 16),
                                         (0, 2, 4, 8), (40, 1, 6, 64)])
def test_moe_align_cuda(t, k, e, block):
    g = torch.Generator().manual_seed(t + k)
    ids = (torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t
           else torch.zeros(0, k, dtype=torch.long)).int()
    for a, b in zip(ops.moe_align(ids.cuda(), e, block), ops_native.moe_align(ids, e, block)):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["one-token", "idle-experts", "all-on-one", "all-on-one-pair",
                                  "e5-odd-sizes", "topk-equals-e", "prefill"])
def test_fused_moe_cuda(dtype, name):
    from test_moe import MOE_CASES, make_moe, same_precision_moe
    t, h, i, e, k, ids = MOE_CASES[name]
    hidden, w13, w2, tw, ti = make_moe(t, h, i, e, k, dtype, seed=t + h, ids=ids)
    out = ops.fused_moe_prepared(hidden.cuda(), ops.prepare_moe_weights(w13.cuda(), w2.cuda()),
                                 tw.cuda(), ti.cuda())
    exact = ops_native.fused_moe(hidden.double(), w13.double(), w2.double(), tw, ti)
    assert_close_to_ref(out.cpu(), same_precision_moe(hidden, w13, w2, tw, ti), exact, what=name)


def test_fused_moe_cuda_large_and_graph():
    # DeepSeek-like fine-grained experts; then a CUDA graph replay with new routing
    from test_moe import make_moe, same_precision_moe
    hidden, w13, w2, tw, ti = make_moe(64, 1024, 512, 64, 6, torch.bfloat16, seed=1)
    hc, w13c, w2c, twc, tic = (x.cuda() for x in (hidden, w13, w2, tw, ti))
    exact = ops_native.fused_moe(hc.double(), w13c.double(), w2c.double(), twc, tic)
    native = same_precision_moe(hc, w13c, w2c, twc, tic)
    assert_close_to_ref(ops.fused_moe(hc, w13c, w2c, twc, tic), native, exact)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.fused_moe(hc, w13c, w2c, twc, tic)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fused_moe(hc, w13c, w2c, twc, tic)
    tic.copy_(torch.roll(tic, 1, 0))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.fused_moe(hc, w13c, w2c, twc, tic), rtol=0, atol=0)


def test_moe_opcheck_cuda():
    from test_moe import make_moe
    hidden, w13, w2, tw, ti = (x.cuda() for x in make_moe(5, 40, 24, 4, 2, torch.bfloat16))
    torch.library.opcheck(torch.ops.octavo.fused_moe.default,
                          (torch.empty_like(hidden), hidden, w13, w2, tw, ti, "silu"))
    w = torch.empty(5, 3, device="cuda")
    ids = torch.empty(5, 3, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.octavo.topk_routing.default,
                          (w, ids, torch.randn(5, 8, device="cuda"), "sigmoid", True, None, 2, 1,
                           "top2_sum", 1.0))
