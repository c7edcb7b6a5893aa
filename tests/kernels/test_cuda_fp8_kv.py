"""The fp8 KV cache (kv_cache_dtype="fp8") on a GPU: reshape_and_cache byte-exact vs
ops_native.fp8_kv_quantize, paged_attention over fp8 caches held to the rule of tests/kernels
against ops_native over the same caches (fp64), and the decode path captured in a CUDA graph.
Skipped where torch.cuda is unavailable; tests/simt/test_simt_cuda_fp8_kv.py runs the same kernels
under the SIMT emulator (with the edge values of the format).

With K/V scales (k_scale / v_scale) the writes are held byte-exact to ops_native run on the CPU:
torch's CUDA division by a Python scalar multiplies by the reciprocal, which the spec (and the
kernels' IEEE division) does not."""
import math

import pytest
import torch

from attention_cases import VARIANT_IDS, VARIANTS, check_graph_decode, make_batch
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FP8 = torch.float8_e4m3fn
DECODE = [(1, 1), (1, 1100), (1, 37), (1, 600), (1, 7000)]
MIXED = [(1, 1), (1, 37), (19, 19), (5, 70), (0, 9), (129, 2000), (300, 300), (3, 3)]
# (k_scale, v_scale): different K and V scales, each above and below 1, and a power of two
SCALES = [(0.37, 3.0), (3.0, 2.0 ** -5), (2.0 ** -5, 0.37)]
SCALE_IDS = ["k0.37-v3", "k3-v2^-5", "k2^-5-v0.37"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_size", [6, 20, 128])
def test_reshape_and_cache_fp8_cuda(dtype, head_size):
    g = torch.Generator().manual_seed(head_size)
    num_tokens, hk, block_size, num_blocks = 301, 3, 16, 24
    scale = torch.logspace(-4, 3, num_tokens)[:, None, None, None]   # flushed .. saturated
    kv = (torch.randn(num_tokens, 2, hk, head_size, generator=g) * scale).to(dtype).cuda()
    kv[0, 0, 0, :6] = torch.tensor([2.0 ** -7, -2.0 ** -7 * 0.99, 2.0 ** -6 * 0.999, 460.0,
                                    -float("inf"), -0.0]).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens].cuda()
    slots[::7] = -1
    shape = (num_blocks, block_size, hk, head_size)
    caches = [torch.zeros(shape, dtype=FP8, device="cuda") for _ in range(4)]
    ops.reshape_and_cache(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    ops_native.reshape_and_cache(kv[:, 0], kv[:, 1], caches[2], caches[3], slots)
    for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def scaled_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache's bytes with every NaN as 0x7f: the sign of NaN / scale is the platform's (a GPU
    returns its canonical positive NaN, x86 keeps the dividend's)."""
    b = cache.view(torch.uint8)
    return torch.where(b & 0x7F == 0x7F, torch.full_like(b, 0x7F), b)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_size", [6, 128])
@pytest.mark.parametrize("k_scale,v_scale", SCALES, ids=SCALE_IDS)
def test_reshape_and_cache_fp8_cuda_scales(dtype, head_size, k_scale, v_scale):
    g = torch.Generator().manual_seed(head_size)
    num_tokens, hk, block_size, num_blocks = 301, 3, 16, 24
    scale = torch.logspace(-4, 3, num_tokens)[:, None, None, None]   # flushed .. saturated
    kv = (torch.randn(num_tokens, 2, hk, head_size, generator=g) * scale).to(dtype)
    # keys whose quotient by k_scale lands next to a rounding tie of the format: there a
    # reciprocal multiply rounds differently from the division
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).double()
    grid = grid[grid >= 2.0 ** -6]
    ties = (((grid[1:] + grid[:-1]) / 2) * k_scale).to(dtype)
    keys = kv[1:, 0].flatten()
    keys[: ties.numel()] = ties
    kv[1:, 0] = keys.view(kv[1:, 0].shape)
    kv[0, 0, 0, :6] = torch.tensor([2.0 ** -7, -2.0 ** -7 * 0.99, 2.0 ** -6 * 0.999, 460.0,
                                    -math.inf, math.nan]).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::7] = -1
    shape = (num_blocks, block_size, hk, head_size)
    gpu = [torch.zeros(shape, dtype=FP8, device="cuda") for _ in range(2)]
    ref = [torch.zeros(shape, dtype=FP8) for _ in range(2)]
    ops.reshape_and_cache(kv[:, 0].cuda(), kv[:, 1].cuda(), gpu[0], gpu[1], slots.cuda(), k_scale,
                          v_scale)
    ops_native.reshape_and_cache(kv[:, 0], kv[:, 1], ref[0], ref[1], slots, k_scale, v_scale)
    for got, want in zip(gpu, ref):
        assert torch.equal(scaled_bytes(got.cpu()), scaled_bytes(want))


def test_scales_ignored_on_model_dtype_cache_cuda():
    # bf16 caches: the scales change neither the write nor the attention
    b = {k: v.cuda() if torch.is_tensor(v) else v
         for k, v in make_batch(MIXED, 8, 2, 128, 16, torch.bfloat16, seed=4).items()}
    key = torch.randn(5, 2, 128, device="cuda").bfloat16()
    slots = torch.tensor([0, 3, -1, 17, 40], device="cuda")
    caches = [torch.zeros_like(b["key_cache"]) for _ in range(4)]
    ops.reshape_and_cache(key, -key, caches[0], caches[1], slots, 0.37, 3.0)
    ops.reshape_and_cache(key, -key, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    for seqs in (DECODE, MIXED):
        b = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in make_batch(seqs, 8, 2, 128, 16, torch.bfloat16, seed=4).items()}
        assert torch.equal(ops.paged_attention(**b, k_scale=0.37, v_scale=3.0), ops.paged_attention(**b))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan], ids=str)
@pytest.mark.parametrize("which", ["k_scale", "v_scale"])
def test_bad_scales_cuda(bad, which):
    b = fp8_batch([(2, 5), (1, 20)], 4, 2, 32, 16, 0, torch.bfloat16)
    scales = {"k_scale": 1.0, "v_scale": 1.0, which: bad}
    match = "k_scale and v_scale must be positive and finite"
    with pytest.raises(RuntimeError, match=f"paged_attention: {match}"):
        ops.paged_attention(**dict(b, **scales))
    key = torch.randn(1, 2, 32, device="cuda")
    with pytest.raises(RuntimeError, match=f"reshape_and_cache: {match}"):
        ops.reshape_and_cache(key, key, b["key_cache"], b["value_cache"],
                              torch.zeros(1, dtype=torch.int64, device="cuda"), **scales)


def fp8_batch(seqs, num_heads, num_kv_heads, head_size, block_size, seed, dtype, k_scale=1.0,
              v_scale=1.0):
    """A batch on the GPU with `dtype` queries and K/V quantized into fp8 caches, stored divided by
    the K/V scales, which the batch carries."""
    b = make_batch(seqs, num_heads, num_kv_heads, head_size, block_size, torch.float32, seed=seed,
                   fill_unused=0.0)
    b["key_cache"] = ops_native.fp8_kv_quantize(b["key_cache"] * 3.0 / k_scale)
    b["value_cache"] = ops_native.fp8_kv_quantize(b["value_cache"] / v_scale)
    b["query"] = b["query"].to(dtype)
    b.update(k_scale=k_scale, v_scale=v_scale)
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}


def check(b, **kw):
    if kw.get("alibi_slopes") is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].cuda()
    out = ops.paged_attention(**b, **kw)
    native = ops_native.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**dict(b, query=b["query"].double()), **kw)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, native, exact, what=f"fp8 paged_attention {b['query'].dtype} {kw}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (8, 1)])
@pytest.mark.parametrize("head_size", [40, 64, 128, 256])
def test_paged_attention_fp8_cuda(dtype, seqs, num_heads, num_kv_heads, head_size):
    check(fp8_batch(seqs, num_heads, num_kv_heads, head_size, 16, num_heads + head_size, dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 3.0)], ids=["unscaled", "scaled"])
def test_paged_attention_fp8_cuda_variants(dtype, seqs, variant, k_scale, v_scale):
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = torch.tensor([2 ** (-8 * (i + 1) / 8) for i in range(8)])
    check(fp8_batch(seqs, 8, 2, 128, 16, 3, dtype, k_scale, v_scale), **kw)


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 3.0)], ids=["unscaled", "scaled"])
def test_paged_attention_fp8_cuda_graph_decode(k_scale, v_scale):
    # the fp8 decode path launches by shapes only too: a captured graph replays with new seq_lens
    check_graph_decode(fp8_batch([(1, 1500), (1, 900), (1, 20)], 8, 2, 64, 16, 2, torch.bfloat16,
                                 k_scale, v_scale))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (8, 1)])
# 40 and 256: the CUDA-core prefill; 64 and 128: the tensor-core one (bf16/fp16 queries)
@pytest.mark.parametrize("head_size", [40, 64, 128, 256])
@pytest.mark.parametrize("k_scale,v_scale", SCALES, ids=SCALE_IDS)
def test_paged_attention_fp8_cuda_scales(dtype, seqs, num_heads, num_kv_heads, head_size, k_scale,
                                         v_scale):
    check(fp8_batch(seqs, num_heads, num_kv_heads, head_size, 16, num_heads + head_size, dtype,
                    k_scale, v_scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("head_size", [64, 40])
def test_paged_attention_fp8_cuda_pow2_scales_equal_dequantized(dtype, seqs, head_size):
    # power-of-two scales are exact: the fp8 kernels give the bits they give over a cache in the
    # query dtype holding the fp8 values times the scales
    b = fp8_batch(seqs, 8, 2, head_size, 16, 7, dtype, 2.0 ** -5, 4.0)
    deq = dict(b, key_cache=b["key_cache"].to(dtype) * 2.0 ** -5,
               value_cache=b["value_cache"].to(dtype) * 4.0, k_scale=1.0, v_scale=1.0)
    assert torch.equal(ops.paged_attention(**b), ops.paged_attention(**deq))
