"""paged_attention kernel vs octavo.ops_native (and the reference vs a dense-mask softmax). On
avx512_bf16 CPUs the bf16 prefill tiles take vdpbf16ps products (QK; PV too where the head size
is whole 16-dim chunks, with the probabilities rounded to bf16): the fp32 tiles they replace are
checked under OCTAVO_CPU_NO_AVX512BF16=1. On AMX CPUs bf16 prefill with head sizes that are
multiples of 32 runs on tiles in chunks of 32 keys; the vdpbf16ps tiles are checked there under
OCTAVO_CPU_NO_AMX=1."""
import math
import os
import subprocess
import sys

import pytest
import torch

from attention_cases import VARIANT_IDS, VARIANTS, make_batch, to_dtype
from kernel_utils import DTYPES, assert_close_to_ref
from octavo import ops, ops_native

# (q_len, seq_len): decode, chunked prefill, full prefill, mixed in one batch
MIXED = [(1, 1), (1, 37), (17, 17), (5, 90), (40, 70), (1, 300), (0, 12), (3, 3)]
HEADS = [(4, 4), (8, 2), (16, 2), (8, 1)]  # GQA ratios 1, 4, 8 and MQA


def check(batch, dtype, **kw):
    b = to_dtype(batch, dtype)
    out = ops.paged_attention(**b, **kw)
    native = ops_native.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**to_dtype(b, torch.float64), **kw)
    assert out.dtype == dtype and out.shape == b["query"].shape
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, native, exact, what=f"paged_attention {kw}")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128, 72])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_paged_attention_mixed_batch(dtype, head_size, block_size, num_heads, num_kv_heads):
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                       seed=head_size + block_size + num_heads)
    check(batch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("variant", [dict(sliding_window=20), dict(sliding_window=1),
                                     dict(soft_cap=5.0), dict(alibi=True),
                                     dict(sliding_window=33, soft_cap=30.0, alibi=True)])
def test_paged_attention_variants(dtype, head_size, variant):
    num_heads, num_kv_heads = 8, 2
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_size, 16, torch.float32, seed=3)
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])
    check(batch, dtype, **kw)


def test_paged_attention_fp16_and_out():
    batch = make_batch(MIXED[:4], 8, 2, 64, 16, torch.float32, seed=5)
    check(batch, torch.float16)
    out = torch.empty_like(batch["query"])
    assert ops.paged_attention(**batch, out=out) is out
    torch.testing.assert_close(out, ops_native.paged_attention(**batch))


def test_paged_attention_decode_large():
    # a decode batch big enough to spread over the threads unevenly (different contexts)
    seqs = [(1, c) for c in (1, 700, 33, 250, 512, 64, 999, 17)]
    check(make_batch(seqs, 16, 4, 128, 16, torch.float32, seed=9), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=700, alibi=True)])
def test_paged_attention_decode_multi_chunk(dtype, kw):
    # decode-like rows whose context exceeds one chunk of scores (the softmax state is carried
    # across chunks) for any thread count: <= 1024 keys per chunk once 32 rows share a kv head
    seqs = [(8, 2100), (8, 1500), (1, 1300), (8, 40)]
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.tensor([2 ** (-8 * (i + 1) / 32) for i in range(32)])
    check(make_batch(seqs, 32, 8, 64, 16, torch.float32, seed=13), dtype, **kw)


# decode contexts: one key, ending inside the first block, just past it, and across many blocks
DECODE_CTXS = [1, 15, 17, 300, 2100]


def variant_kwargs(variant, num_heads):
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])
    return kw


@pytest.mark.parametrize("head_size", [64, 128, 256, 96, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 4), (16, 4), (16, 2)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_decode_bf16(head_size, num_heads, num_kv_heads, block_size):
    # bf16 decode items (several kv heads per item, one for GQA 8): on avx512_bf16 CPUs items with
    # 1 or 2 rows per kv head (MHA, GQA 2, MHA with a 2-token query) take vdpbf16ps scores 16
    # keys at a time and PV over key pairs with bf16 probabilities where the head size is whole
    # 32-dim chunks (80 keeps the fp32 passes, as do GQA 4 and 8); one batch mixes every context
    # length, and a 2-token query (speculative decode) shares it
    seqs = [(1, c) for c in DECODE_CTXS] + [(2, 45)]
    check(make_batch(seqs, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                     seed=head_size + num_heads + block_size), torch.bfloat16)


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_paged_attention_decode_bf16_variants(head_size, variant):
    # sliding windows (spans that start inside a block), soft-cap and ALiBi on the bf16 decode
    # passes (MHA, GQA 2) and the fp32 ones (GQA 4)
    seqs = [(1, c) for c in DECODE_CTXS] + [(1, 64)]
    for num_heads, num_kv_heads in ((8, 8), (8, 4), (16, 4)):
        check(make_batch(seqs, num_heads, num_kv_heads, head_size, 16, torch.float32, seed=head_size + 1),
              torch.bfloat16, **variant_kwargs(variant, num_heads))


def test_paged_attention_long_prefill():
    check(make_batch([(300, 300), (129, 400)], 8, 8, 64, 32, torch.float32, seed=11), torch.bfloat16,
          sliding_window=100)


def test_paged_attention_long_prefill_gqa_head_sizes():
    # prefill tiles (one kv head, > 8 rows per item) for every head size the models use: bf16
    # QK and PV (64, 128, 80, 96), QK only (72: PV stays fp32), odd key counts per block
    for head_size in (64, 128, 80, 96, 72):
        check(make_batch([(200, 200), (77, 150), (33, 33)], 16, 4, head_size, 16, torch.float32,
                         seed=head_size), torch.bfloat16)
    check(make_batch([(150, 150)], 8, 2, 128, 32, torch.float32, seed=4), torch.bfloat16,
          soft_cap=20.0, sliding_window=61)


@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_paged_attention_prefill_key_chunks(block_size):
    # 32-key chunks over blocks of 8 (every chunk crosses blocks), 16 and 64; chunks that start
    # inside a block (sliding windows), run out mid-chunk (odd contexts) or hold one key; GQA
    # with 64 rows per item, MHA with 16, head sizes 64..256
    for head_size in (64, 128, 256, 96):
        check(make_batch([(200, 200), (77, 150), (33, 33), (17, 50)], 16, 4, head_size, block_size,
                         torch.float32, seed=head_size + block_size), torch.bfloat16)
    check(make_batch([(150, 150), (40, 95)], 8, 8, 128, block_size, torch.float32, seed=7),
          torch.bfloat16, sliding_window=45)
    check(make_batch([(130, 161)], 16, 2, 64, block_size, torch.float32, seed=8), torch.bfloat16,
          soft_cap=20.0, sliding_window=37)


def test_paged_attention_prefill_rising_scores():
    # keys from position 150 on scaled up 60x: a later key chunk's scores rise far above the
    # running max of the first (on AMX the one-pass softmax against the running max must redo
    # such a chunk with the new max), and 2x (a rise it may keep); MHA and GQA, head sizes 64/128
    for factor in (60.0, 2.0):
        for num_heads, num_kv_heads, head_size in ((8, 8, 64), (16, 4, 128)):
            batch = make_batch([(400, 400), (100, 300)], num_heads, num_kv_heads, head_size, 16,
                               torch.float32, seed=int(factor) + head_size)
            bs = batch["key_cache"].shape[1]
            for s, ctx in enumerate(batch["seq_lens"].tolist()):
                for j in range(150, ctx):
                    batch["key_cache"][batch["block_table"][s, j // bs], j % bs] *= factor
            check(batch, torch.bfloat16)


NO_AMX_SCRIPT = r"""
import torch
import test_attention as t
for bs in (8, 16):
    t.test_paged_attention_prefill_key_chunks(bs)
t.test_paged_attention_long_prefill_gqa_head_sizes()
print("ok")
"""


def _run_ok(script, **env):
    """Runs script (which prints "ok" at its end) in a subprocess with env added."""
    res = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_prefill_tiles_without_amx():
    # the vdpbf16ps tiles bf16 prefill takes on avx512_bf16 CPUs without AMX (forced off here)
    _run_ok(NO_AMX_SCRIPT, OCTAVO_CPU_NO_AMX="1")


FP32_TILES_SCRIPT = r"""
import torch
import test_attention as t
from attention_cases import make_batch
for head_size in (64, 128, 72):
    t.check(make_batch([(200, 200), (77, 150), (1, 40)], 16, 4, head_size, 16, torch.float32,
                       seed=head_size), torch.bfloat16)
t.test_paged_attention_long_prefill()
print("ok")
"""


def test_fp32_prefill_tiles_for_bf16():
    # the tiles bf16 takes on CPUs without avx512_bf16 (forced off here)
    _run_ok(FP32_TILES_SCRIPT, OCTAVO_CPU_NO_AVX512BF16="1")


FP32_DECODE_SCRIPT = r"""
import torch
import test_attention as t
from attention_cases import VARIANTS
for head_size in (64, 128, 96):
    t.test_paged_attention_decode_bf16(head_size, 8, 8, 16)
t.test_paged_attention_decode_bf16(64, 8, 4, 32)
for variant in VARIANTS:
    t.test_paged_attention_decode_bf16_variants(64, variant)
print("ok")
"""


def test_fp32_decode_for_bf16():
    # the fp32 decode passes bf16 takes on CPUs without avx512_bf16 (forced off here)
    _run_ok(FP32_DECODE_SCRIPT, OCTAVO_CPU_NO_AVX512BF16="1")


def test_empty_batch():
    batch = make_batch([(0, 5)], 4, 2, 64, 16, torch.float32)
    assert ops.paged_attention(**batch).shape == (0, 4, 64)


def test_native_reference_vs_dense_softmax():
    """ops_native.paged_attention is the reference for everything else: check it against a
    dense masked softmax written out here, with every feature on."""
    seqs = [(3, 10), (1, 7), (6, 6)]
    hq, hk, hd, window, cap = 4, 2, 16, 4, 2.0
    b = make_batch(seqs, hq, hk, hd, 4, torch.float64, seed=1)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    out = ops_native.paged_attention(**b, sliding_window=window, soft_cap=cap, alibi_slopes=slopes)
    q0 = 0
    for s, (q_len, ctx) in enumerate(seqs):
        bt = b["block_table"][s]
        k = torch.stack([b["key_cache"][bt[j // 4], j % 4] for j in range(ctx)])    # [ctx, hk, hd]
        v = torch.stack([b["value_cache"][bt[j // 4], j % 4] for j in range(ctx)])
        for i in range(q_len):
            p = ctx - q_len + i
            for h in range(hq):
                kh = h // (hq // hk)
                logits = torch.empty(ctx, dtype=torch.float64)
                for j in range(ctx):
                    x = b["scale"] * float(b["query"][q0 + i, h] @ k[j, kh])
                    x = cap * math.tanh(x / cap) + float(slopes[h]) * (j - p)
                    allowed = j <= p and j > p - window
                    logits[j] = x if allowed else -math.inf
                w = torch.softmax(logits, 0)
                torch.testing.assert_close(out[q0 + i, h], w @ v[:, kh], rtol=1e-10, atol=1e-12)
        q0 += q_len


def test_errors():
    b = make_batch([(2, 5)], 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.paged_attention(**{**b, "query": torch.randn(2, 3, 64)})
    with pytest.raises(RuntimeError, match="int32"):
        ops.paged_attention(**{**b, "seq_lens": b["seq_lens"].long()})
    with pytest.raises(RuntimeError, match="seq_len"):
        ops.paged_attention(**{**b, "seq_lens": torch.tensor([1], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="dtype"):
        ops.paged_attention(**to_dtype(b, torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    b = to_dtype(make_batch([(2, 5), (1, 20)], 4, 2, 32, 16, torch.float32, fill_unused=0.0), dtype)
    args = (torch.empty_like(b["query"]), b["query"], b["key_cache"], b["value_cache"],
            b["query_start_loc"], b["seq_lens"], b["block_table"], b["scale"], 0, 0.0, None)
    torch.library.opcheck(torch.ops.octavo.paged_attention.default, args)
    args = args[:8] + (3, 10.0, torch.rand(4))
    torch.library.opcheck(torch.ops.octavo.paged_attention.default, args)
