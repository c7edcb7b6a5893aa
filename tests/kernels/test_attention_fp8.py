"""The fp8 KV cache (kv_cache_dtype="fp8"): reshape_and_cache quantizing into float8_e4m3fn caches
and paged_attention reading them, against octavo.ops_native (torch's own fp8 conversion, fp64
attention over the dequantized caches) and hand-computed values of the format.

On avx512_bf16 CPUs decode sequences (head sizes 32..256 in 32s) read the fp8 cache directly:
with one or two query rows per kv head they multiply in bf16 (queries and probabilities rounded to
bf16 whatever the query dtype), so the kernel is held to twice the error of the reference run with
bf16 queries; with more (GQA 4, 8, MQA) each block's rows are decoded to fp32 once for all rows.
Prefill sequences, other head sizes and CPUs without avx512_bf16 (forced here with
OCTAVO_CPU_NO_AVX512BF16=1) attend over dequantized copies of their blocks."""
import os
import subprocess
import sys

import pytest
import torch

from attention_cases import make_batch
from kernel_utils import max_err
from octavo import ops, ops_native

FP8 = torch.float8_e4m3fn
MIXED = [(1, 1), (1, 37), (17, 17), (5, 90), (40, 70), (1, 300), (0, 12), (3, 3)]
DECODE = [(1, c) for c in (1, 15, 16, 17, 33, 190, 300, 513)] + [(2, 45)]


def quantized(batch):
    """The batch with K/V stored through the reference quantizer (fp32 K/V scaled to reach
    well beyond 1 and below 2^-6, so saturation-free rounding and the tiny values both occur)."""
    out = dict(batch)
    for name, scale in (("key_cache", 3.0), ("value_cache", 1.0)):
        c = torch.nan_to_num(batch[name], nan=0.0) * scale
        out[name] = ops_native.fp8_kv_quantize(c)
    return out


def check(batch, dtype, **kw):
    b = dict(batch, query=batch["query"].to(dtype))
    out = ops.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**dict(b, query=b["query"].double()), **kw)
    # the reference with the kernel's worst-case precision: bf16 queries, fp32 sums
    bf16 = ops_native.paged_attention(**dict(b, query=b["query"].bfloat16()), **kw)
    assert out.dtype == dtype and out.shape == b["query"].shape
    assert torch.isfinite(out).all()
    err, ref_err = max_err(out, exact), max_err(bf16, exact)
    assert err <= 2 * ref_err + 1e-5, f"fp8 paged_attention {dtype} {kw}: {err:.3g} > 2 x {ref_err:.3g}"
    return out


def test_quantizer_hand_values():
    # e4m3: 3 mantissa bits, largest 448; no subnormals in the cache format
    x = torch.tensor([0.3, 17.0, 19.0, 1000.0, -float("inf"), 2.0 ** -8, 0.009, -0.0100, 0.0157,
                      2.0 ** -6, 447.0, -3.3])
    want = [0.3125, 16.0, 20.0, 448.0, -448.0, 0.0, 2.0 ** -6, -2.0 ** -6, 2.0 ** -6,
            2.0 ** -6, 448.0, -3.25]
    assert ops_native.fp8_kv_quantize(x).float().tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reshape_and_cache_fp8(dtype):
    g = torch.Generator().manual_seed(0)
    T, hk, hd, nb, bs = 41, 3, 64, 12, 16
    scale = torch.logspace(-4, 3, T)[:, None, None]           # 1e-4 .. 1e3: flushed to saturated
    k = (torch.randn(T, hk, hd, generator=g) * scale).to(dtype)
    v = torch.randn(T, 2 * hk, hd, generator=g).to(dtype)[:, ::2]   # strided heads
    k[0, 0, :6] = torch.tensor([2.0 ** -7, -2.0 ** -7 * 0.99, 2.0 ** -6 * 0.999, 460.0, -65000.0, 0.0])
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[3] = -1
    caches = [torch.zeros(nb, bs, hk, hd, dtype=FP8) for _ in range(4)]
    ops.reshape_and_cache(k, v, caches[0], caches[1], slots)
    ops_native.reshape_and_cache(k, v, caches[2], caches[3], slots)
    for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert caches[0].view(torch.uint8).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("head_size", [64, 128, 32, 256, 80])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 2), (8, 1)])
def test_paged_attention_fp8_mixed(dtype, head_size, num_heads, num_kv_heads):
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_size, 16, torch.float32,
                       seed=head_size + num_heads, fill_unused=0.0)
    check(quantized(batch), dtype)


@pytest.mark.parametrize("head_size", [64, 128, 96])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 4), (16, 4)])
def test_paged_attention_fp8_decode(head_size, block_size, num_heads, num_kv_heads):
    batch = make_batch(DECODE, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                       seed=head_size + block_size, fill_unused=0.0)
    check(quantized(batch), torch.bfloat16)


@pytest.mark.parametrize("variant", [dict(sliding_window=20), dict(soft_cap=5.0), dict(alibi=True),
                                     dict(sliding_window=33, soft_cap=30.0, alibi=True)])
def test_paged_attention_fp8_variants(variant):
    num_heads, num_kv_heads = 8, 2
    batch = quantized(make_batch(MIXED + DECODE, num_heads, num_kv_heads, 64, 16, torch.float32,
                                 seed=7, fill_unused=0.0))
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])
    check(batch, torch.bfloat16, **kw)


def test_fp8_matches_the_dequantized_cache():
    """The fp8 cache attends exactly like a model-dtype cache holding the dequantized values, on
    the paths that read dequantized copies (prefill) and up to bf16 rounding on decode ones."""
    batch = quantized(make_batch(MIXED, 8, 2, 64, 16, torch.float32, seed=2, fill_unused=0.0))
    out = ops.paged_attention(**batch)
    deq = dict(batch, key_cache=batch["key_cache"].float(), value_cache=batch["value_cache"].float())
    ref = ops.paged_attention(**deq)
    starts = batch["query_start_loc"].tolist()
    prefill = [i for s, (q, _) in enumerate(MIXED) if q * 8 > 256 or q > 20
               for i in range(starts[s], starts[s + 1])]
    torch.testing.assert_close(out[prefill], ref[prefill], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-2)


def test_fp8_errors():
    b = quantized(make_batch([(2, 5)], 4, 2, 64, 16, torch.float32))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.paged_attention(**dict(b, value_cache=b["value_cache"].float()))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.reshape_and_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), b["key_cache"],
                              b["value_cache"].float(), torch.zeros(1, dtype=torch.int64))


SCALES = [(0.37, 3.0), (2.0 ** -5, 0.011), (40.0, 1.0)]


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_fp8_scales(dtype, k_scale, v_scale):
    """With scales the cache stores K / k_scale and V / v_scale (fp32 division, then the
    format's rounding): byte-identical to the reference, and equal to quantizing the divided
    values by hand."""
    g = torch.Generator().manual_seed(1)
    T, hk, hd, nb, bs = 37, 2, 64, 8, 16
    k = (torch.randn(T, hk, hd, generator=g) * torch.logspace(-3, 2, T)[:, None, None]).to(dtype)
    v = (torch.randn(T, hk, hd, generator=g) * 0.05).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    caches = [torch.zeros(nb, bs, hk, hd, dtype=FP8) for _ in range(4)]
    ops.reshape_and_cache(k, v, caches[0], caches[1], slots, k_scale, v_scale)
    ops_native.reshape_and_cache(k, v, caches[2], caches[3], slots, k_scale, v_scale)
    for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    blocks, offs = slots // bs, slots % bs
    for cache, x, s in ((caches[0], k, k_scale), (caches[1], v, v_scale)):
        by_hand = ops_native.fp8_kv_quantize(x.float() / torch.tensor(s, dtype=torch.float32))
        assert torch.equal(cache[blocks, offs].view(torch.uint8), by_hand.view(torch.uint8))
    # model-dtype caches ignore the scales: a plain copy
    plain = [torch.zeros(nb, bs, hk, hd, dtype=dtype) for _ in range(2)]
    ops.reshape_and_cache(k, v, plain[0], plain[1], slots, k_scale, v_scale)
    assert torch.equal(plain[0][blocks, offs], k) and torch.equal(plain[1][blocks, offs], v)


def scaled_reference(batch, k_scale, v_scale):
    """The batch's fp8 caches as fp32 caches holding stored * scale: what a scaled fp8 cache
    means, attended through the unscaled reference."""
    return dict(batch, key_cache=batch["key_cache"].float() * k_scale,
                value_cache=batch["value_cache"].float() * v_scale)


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 2)])
def test_paged_attention_fp8_scales(num_heads, num_kv_heads, k_scale, v_scale):
    """Decode (bf16 passes with 1-2 rows per kv head, fp32 ones with more) and prefill rows
    (dequantized copies) read K as stored * k_scale and V as stored * v_scale: against fp64
    attention over caches holding those values, within twice the bf16-query reference's error."""
    batch = quantized(make_batch(MIXED + DECODE, num_heads, num_kv_heads, 64, 16, torch.float32,
                                 seed=num_heads + num_kv_heads, fill_unused=0.0))
    b = dict(batch, query=batch["query"].bfloat16())
    out = ops.paged_attention(**b, k_scale=k_scale, v_scale=v_scale)
    ref = scaled_reference(b, k_scale, v_scale)
    exact = ops_native.paged_attention(**dict(ref, query=b["query"].double()))
    bf16 = ops_native.paged_attention(**ref)     # bf16 queries, fp32 sums
    err, ref_err = max_err(out, exact), max_err(bf16, exact)
    assert err <= 2 * ref_err + 1e-5 * v_scale, f"scales {k_scale}, {v_scale}: {err:.3g} > 2 x {ref_err:.3g}"
    # the plain-PyTorch op agrees on what the scales mean
    native = ops_native.paged_attention(**dict(b, query=b["query"].double()), k_scale=k_scale,
                                        v_scale=v_scale)
    torch.testing.assert_close(native, exact, rtol=1e-6, atol=1e-6 * v_scale)
    # and they matter: the unscaled result is far off whenever a scale is not 1
    unscaled = ops.paged_attention(**b)
    assert max_err(unscaled, exact) > 10 * err


def test_fp8_scales_ignored_and_checked():
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.bfloat16, seed=3, fill_unused=0.0)
    # a model-dtype cache ignores the scales
    torch.testing.assert_close(ops.paged_attention(**batch, k_scale=0.5, v_scale=4.0),
                               ops.paged_attention(**batch), rtol=0, atol=0)
    q = quantized(batch)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="k_scale and v_scale must be positive and finite"):
            ops.paged_attention(**q, k_scale=bad)
        with pytest.raises(RuntimeError, match="k_scale and v_scale must be positive and finite"):
            ops.reshape_and_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), q["key_cache"],
                                  q["value_cache"], torch.zeros(1, dtype=torch.int64), 1.0, bad)
        with pytest.raises(ValueError, match="k_scale and v_scale must be positive and finite"):
            ops_native.paged_attention(**q, v_scale=bad)


OTHER_PATHS_SCRIPT = r"""
import torch
import test_attention_fp8 as t
for dtype in (torch.bfloat16, torch.float32):
    for hs in (64, 128, 80):
        t.test_paged_attention_fp8_mixed(dtype, hs, 8, 2)
for hs in (64, 128):
    t.test_paged_attention_fp8_decode(hs, 16, 8, 8)
for v in ({"sliding_window": 20}, {"alibi": True}):
    t.test_paged_attention_fp8_variants(v)
t.test_reshape_and_cache_fp8(torch.bfloat16)
t.test_reshape_and_cache_fp8_scales(torch.float32, 0.37, 3.0)
t.test_paged_attention_fp8_scales(8, 2, 0.37, 3.0)
print("ok")
"""


@pytest.mark.parametrize("env", [dict(OCTAVO_CPU_NO_AVX512BF16="1"), dict(ATEN_CPU_CAPABILITY="avx2"),
                                 dict(ATEN_CPU_CAPABILITY="default")], ids=["no-avx512bf16", "avx2", "default"])
def test_fp8_other_cpu_paths(env):
    # every sequence through dequantized copies (no avx512_bf16), and the AVX2 / DEFAULT builds of
    # both ops (the fp8 rounding in cache writes)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", OTHER_PATHS_SCRIPT], cwd=here, capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
