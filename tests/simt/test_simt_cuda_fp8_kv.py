"""The fp8 KV cache (kv_cache_dtype="fp8") on the CUDA path under the SIMT emulator:
reshape_and_cache quantizing into float8_e4m3fn caches (byte-exact vs ops_native.fp8_kv_quantize)
and the paged attention kernels (split-context decode, CUDA-core prefill, tensor-core prefill)
reading them.

The kernels decode each cache byte to its exact fp32 value and then compute as with a model-dtype
cache, so attention is held to the rule of tests/kernels against ops_native over the same fp8
caches: at most twice the error of the PyTorch reference run with the kernel's query dtype (fp32
sums; the tensor-core prefill also rounds P to bf16/fp16, as with any cache), measured against that
reference in fp64. With bf16/fp16 queries the fp8 kernels must moreover give bit for bit what the
same kernels give over a bf16/fp16 cache holding the dequantized values (every fp8 KV value is
exact in both, and the loads have the same shape).

With K/V scales (vLLM's k_scale / v_scale) the caches store key / k_scale (IEEE fp32 division, then
the rounding above) and the kernels read K = stored * k_scale, V = stored * v_scale: the writes are
byte-exact against ops_native again, attention is held to the same rule against ops_native with
the same scales, and with power-of-two scales (exact) the fp8 kernels must give bit for bit what
they give over a bf16/fp16 cache holding the dequantized values times the scales."""
import math

import pytest
import torch

import simt_ext
from attention_cases import VARIANT_IDS, VARIANTS, make_batch
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops_native

FP8 = torch.float8_e4m3fn
# decode rows only (T == S: the split-context kernels); 1100 keys span three 512-key partitions
DECODE = [(1, 1), (1, 1100), (1, 37), (1, 600)]
# decode rows, chunked prefills over a cached prefix, full prefills (one longer than a 64-row
# tensor-core tile once G heads are packed), an empty sequence
MIXED = [(1, 1), (1, 37), (19, 19), (5, 70), (0, 9), (40, 40), (3, 3)]
HEADS = [(4, 4), (8, 2), (4, 1)]  # GQA ratios 1, 4 and MQA
# (k_scale, v_scale): different K and V scales, each above and below 1, and a power of two
SCALES = [(0.37, 3.0), (3.0, 2.0 ** -5), (2.0 ** -5, 0.37)]
SCALE_IDS = ["k0.37-v3", "k3-v2^-5", "k2^-5-v0.37"]
BAD_SCALES = [0.0, -1.0, math.inf, -math.inf, math.nan]


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def alibi(num_heads):
    return torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])


def bits_below(x: torch.Tensor) -> torch.Tensor:
    """The next representable magnitude below each positive x, in x's dtype."""
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return (x.view(int_type[x.dtype]) - 1).view(x.dtype)


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """Values at and next to every boundary of the format, both signs, in dtype: the flush and
    2^-6 thresholds, every e4m3 value and every midpoint between neighbours (ties to even) with
    the representable values just below them, the saturation region, huge values, infinities,
    signed zeros and NaNs."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()   # 0 .. 448, no NaN
    grid = grid[grid >= 2.0 ** -6]
    mids = (grid[1:] + grid[:-1]) / 2
    big = [448.0, 450.0, 455.0, 463.0, 464.0, 465.0, 500.0, 1e4, 65504.0, 1e30, math.inf]
    pos = torch.cat([torch.tensor([2.0 ** -7, 2.0 ** -6, 2.0 ** -6 * 1.5, 3e-3]), grid, mids,
                     torch.tensor(big)]).to(dtype)
    finite = pos[torch.isfinite(pos) & (pos > 0)]
    pos = torch.cat([pos, bits_below(finite), torch.tensor([0.0, math.nan], dtype=dtype)])
    return torch.cat([pos, -pos])


def cache_case(dtype, num_tokens, num_kv_heads, head_size, block_size, seed):
    """Strided key/value views with random values over 1e-4 .. 1e3 (flushed to saturated) and the
    edge values in the first rows; slots with padding; fp8 caches of random bytes (NaNs too)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 3, num_tokens)[:, None, None, None]
    kv = (torch.randn(num_tokens, 2, num_kv_heads, head_size, generator=g) * scale).to(dtype)
    edges = edge_values(dtype)
    flat = kv.view(-1)
    flat[: edges.numel()] = edges[: flat.numel()]
    flat[-min(flat.numel(), edges.numel()):] = edges.flip(0)[: flat.numel()]
    num_blocks = (num_tokens + block_size - 1) // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    caches = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(FP8) for _ in range(2)]
    return kv[:, 0], kv[:, 1], caches, slots


@pytest.mark.parametrize("dtype", ALL_DTYPES)
# head sizes 64/128/8 take vector loads and stores (4 or 8 bytes); 20 (fp16/bf16) and 6 are scalar
@pytest.mark.parametrize("num_kv_heads,head_size,block_size", [(3, 64, 4), (1, 128, 16), (8, 8, 1),
                                                            (2, 20, 3), (2, 6, 5)])
def test_reshape_and_cache_fp8(simt, dtype, num_kv_heads, head_size, block_size):
    key, value, caches, slots = cache_case(dtype, 97, num_kv_heads, head_size, block_size, head_size)
    emu = [c.clone() for c in caches]
    simt.reshape_and_cache(key, value, emu[0], emu[1], slots)
    ops_native.reshape_and_cache(key, value, caches[0], caches[1], slots)
    for got, ref in zip(emu, caches):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def one_value_rows(x: torch.Tensor, head_size: int):
    """x zero-padded to whole rows of head_size as a key [n, 1, head_size], its slots (one token
    per block) and four empty fp8 caches for it (two written by the kernel, two by ops_native)."""
    n = (x.numel() + head_size - 1) // head_size * head_size
    key = torch.zeros(n, dtype=x.dtype)
    key[: x.numel()] = x
    key = key.view(-1, 1, head_size)
    caches = [torch.zeros(key.shape[0], 1, 1, head_size, dtype=FP8) for _ in range(4)]
    return key, torch.arange(key.shape[0]), caches


def test_reshape_and_cache_fp8_every_edge(simt):
    # every edge value of every dtype through the scalar and the vector path, slot by slot
    for dtype in ALL_DTYPES:
        for head_size in (8, 1):
            key, slots, caches = one_value_rows(edge_values(dtype), head_size)
            simt.reshape_and_cache(key, -key, caches[0], caches[1], slots)
            ops_native.reshape_and_cache(key, -key, caches[2], caches[3], slots)
            for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
                assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), (dtype, head_size)
    # and a few by hand: 2^-7 -> 2^-6, below -> 0, 17 -> 16 (tie to even), 460 -> 448, inf -> 448
    x = torch.tensor([2.0 ** -7, 2.0 ** -7 * 0.99, 17.0, 460.0, math.inf, -0.0, 0.3, math.nan])
    caches = [torch.zeros(8, 1, 1, 1, dtype=FP8) for _ in range(2)]
    simt.reshape_and_cache(x.view(8, 1, 1), x.view(8, 1, 1), caches[0], caches[1], torch.arange(8))
    assert caches[0].view(torch.uint8).flatten().tolist() == [0x08, 0x00, 0x58, 0x7e, 0x7e, 0x80, 0x2a, 0x7f]


def tie_values(scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Inputs whose quotient by `scale` lands on or next to a midpoint between two fp8 values, in
    dtype: there a reciprocal multiply (x * (1 / scale)) rounds differently from the division."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).double()
    grid = grid[grid >= 2.0 ** -6]
    x = (((grid[1:] + grid[:-1]) / 2) * scale).to(dtype)
    pos = torch.cat([x, bits_below(x), (x.view(bits_below(x).dtype) + 1).view(dtype)])
    return torch.cat([pos, -pos])


def scaled_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache's bytes with every NaN as 0x7f: the sign of NaN / scale is the platform's
    (x86 keeps the dividend's, a GPU returns its canonical positive NaN; torch's CPU division
    does either), so a scaled write is byte-exact up to the sign of NaN."""
    b = cache.view(torch.uint8)
    return torch.where(b & 0x7F == 0x7F, torch.full_like(b, 0x7F), b)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES, ids=SCALE_IDS)
# 64 and 8: the vector path; 6: the scalar one
@pytest.mark.parametrize("num_kv_heads,head_size,block_size", [(3, 64, 4), (8, 8, 1), (2, 6, 5)])
def test_reshape_and_cache_fp8_scales(simt, dtype, k_scale, v_scale, num_kv_heads, head_size,
                                      block_size):
    key, value, caches, slots = cache_case(dtype, 97, num_kv_heads, head_size, block_size, head_size)
    emu = [c.clone() for c in caches]
    simt.reshape_and_cache(key, value, emu[0], emu[1], slots, k_scale, v_scale)
    ops_native.reshape_and_cache(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    for got, ref in zip(emu, caches):
        assert torch.equal(scaled_bytes(got), scaled_bytes(ref))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("scale", [0.37, 3.0, 0.1, 2.0 ** -5])
def test_reshape_and_cache_fp8_scale_ties(simt, dtype, scale):
    # values next to the rounding ties of x / scale and the format's edges, as key (scaled by
    # `scale`) and value (by 1 / scale), through the vector (hd 8) and the scalar (hd 1) path
    x = torch.cat([tie_values(scale, dtype), edge_values(dtype)])
    for head_size in (8, 1):
        key, slots, caches = one_value_rows(x, head_size)
        simt.reshape_and_cache(key, key, caches[0], caches[1], slots, scale, 1 / scale)
        ops_native.reshape_and_cache(key, key, caches[2], caches[3], slots, scale, 1 / scale)
        for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
            assert torch.equal(scaled_bytes(got), scaled_bytes(ref)), (dtype, head_size)
    if dtype == torch.float32 and scale != 2.0 ** -5:
        # the inputs tell the division from a reciprocal multiply (else this test could not)
        recip = ops_native.fp8_kv_quantize(x * (1 / scale)).view(torch.uint8)
        assert not torch.equal(recip, ops_native.fp8_kv_quantize(x / scale).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reshape_and_cache_scales_ignored_on_model_dtype_cache(simt, dtype):
    key, value, fp8_caches, slots = cache_case(dtype, 41, 2, 16, 4, seed=1)
    caches = [torch.zeros(fp8_caches[0].shape, dtype=dtype) for _ in range(4)]
    simt.reshape_and_cache(key, value, caches[0], caches[1], slots, 0.37, 3.0)
    ops_native.reshape_and_cache(key, value, caches[2], caches[3], slots)
    for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def quantized(batch, k_scale=1.0, v_scale=1.0):
    """The batch with K/V stored through the reference quantizer (scaled so that values beyond 1
    and below 2^-6 both occur) divided by the K/V scales, which the batch then carries; unused
    slots stay NaN bytes, which no kernel may read."""
    out = dict(batch, k_scale=k_scale, v_scale=v_scale)
    for name, mult, kv_scale in (("key_cache", 3.0, k_scale), ("value_cache", 1.0, v_scale)):
        out[name] = ops_native.fp8_kv_quantize(batch[name] * mult / kv_scale)
    return out


def run(simt, b, **kw):
    out = torch.full_like(b["query"], float("nan"))
    simt.paged_attention(out, b["query"], b["key_cache"], b["value_cache"], b["query_start_loc"],
                         b["seq_lens"], b["block_table"], b["scale"], kw.get("sliding_window", 0),
                         kw.get("soft_cap", 0.0), kw.get("alibi_slopes"), b.get("k_scale", 1.0),
                         b.get("v_scale", 1.0))
    return out


def check(simt, batch, dtype, **kw):
    """Emulated fp8 attention with `dtype` queries vs ops_native over the same fp8 caches."""
    b = dict(batch, query=batch["query"].to(dtype))
    out = run(simt, b, **kw)
    native = ops_native.paged_attention(**b, **kw)
    exact = ops_native.paged_attention(**dict(b, query=b["query"].double()), **kw)
    rows = int(b["query_start_loc"][-1])
    assert torch.isfinite(out[:rows]).all()
    assert_close_to_ref(out[:rows], native[:rows], exact[:rows], what=f"fp8 paged_attention {dtype} {kw}")
    return out


def batch_for(seqs, num_heads, num_kv_heads, head_size, block_size, seed, k_scale=1.0, v_scale=1.0):
    return quantized(make_batch(seqs, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                                seed=seed), k_scale, v_scale)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_fp8_decode_split_context(simt, dtype, num_heads, num_kv_heads):
    check(simt, batch_for(DECODE, num_heads, num_kv_heads, 64, 16, seed=num_heads + num_kv_heads), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_fp8_prefill_mixed(simt, dtype, num_heads, num_kv_heads):
    # bf16/fp16 queries take the tensor-core prefill (head size 64), fp32 the CUDA-core one
    check(simt, batch_for(MIXED, num_heads, num_kv_heads, 64, 7, seed=num_heads * num_kv_heads), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
# 8 and 40: one and five 8-byte loads per row, CUDA-core prefill; 80, 128: tensor-core prefill
# with bf16 queries; 256: the largest bucket
@pytest.mark.parametrize("head_size", [8, 40, 80, 128, 256])
def test_fp8_head_sizes(simt, dtype, head_size):
    for seqs in ([(1, 13), (1, 530), (1, 3)], [(1, 13), (6, 40), (2, 2), (17, 17)]):
        check(simt, batch_for(seqs, 4, 2, head_size, 5, seed=head_size), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_fp8_variants(simt, dtype, seqs, variant):
    num_heads, num_kv_heads = 8, 2
    batch = batch_for(seqs, num_heads, num_kv_heads, 32, 16, seed=3)
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = alibi(num_heads)
    check(simt, batch, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [64, 40])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (2.0 ** -5, 4.0)], ids=["unscaled", "pow2"])
def test_fp8_equals_dequantized_cache(simt, dtype, head_size, seqs, k_scale, v_scale):
    # the same kernels over a cache in the query dtype holding the fp8 values times the scales:
    # identical bits, the scales being powers of two (head size 64: the tensor-core prefill for
    # mixed batches; 40: the CUDA-core one; decode: three partitions and the merge)
    batch = batch_for(seqs, 8, 2, head_size, 16, seed=head_size + 1, k_scale=k_scale, v_scale=v_scale)
    b = dict(batch, query=batch["query"].to(dtype))
    kw = dict(sliding_window=300, soft_cap=30.0, alibi_slopes=alibi(8))
    out = run(simt, b, **kw)
    deq = dict(b, key_cache=b["key_cache"].to(dtype) * k_scale,
               value_cache=b["value_cache"].to(dtype) * v_scale)
    ref = run(simt, dict(deq, k_scale=1.0, v_scale=1.0), **kw)
    rows = int(b["query_start_loc"][-1])
    assert torch.isfinite(out[:rows]).all()
    assert torch.equal(out[:rows], ref[:rows])


# decode rows of contexts under one 512-key chunk: one partition, no workspace, no merge
DECODE_SHORT = [(1, 1), (1, 37), (1, 300), (1, 512)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seqs", [DECODE, DECODE_SHORT, MIXED], ids=["decode", "decode1", "mixed"])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("k_scale,v_scale", SCALES, ids=SCALE_IDS)
def test_fp8_scales(simt, dtype, seqs, num_heads, num_kv_heads, k_scale, v_scale):
    # head size 64: bf16/fp16 mixed batches take the tensor-core prefill, fp32 the CUDA-core one
    check(simt, batch_for(seqs, num_heads, num_kv_heads, 64, 16, seed=num_heads, k_scale=k_scale,
                          v_scale=v_scale), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
# 40 and 256: the CUDA-core prefill for every query dtype; 128: tensor-core with bf16 queries
@pytest.mark.parametrize("head_size", [40, 128, 256])
@pytest.mark.parametrize("variant", [{}, VARIANTS[-1]], ids=["plain", "all"])
def test_fp8_scales_head_sizes(simt, dtype, head_size, variant):
    kw = {k: v for k, v in variant.items() if k != "alibi"}
    if variant.get("alibi"):
        kw["alibi_slopes"] = alibi(4)
    for seqs in ([(1, 13), (1, 530), (1, 3)], [(1, 13), (6, 40), (2, 2), (17, 17)]):
        check(simt, batch_for(seqs, 4, 2, head_size, 5, seed=head_size, k_scale=0.37, v_scale=3.0),
              dtype, **kw)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
def test_scales_ignored_on_model_dtype_cache(simt, cache_dtype, seqs):
    # a bf16/fp16 cache is read as it is, whatever the scales (head size 64 and 40: both prefills)
    for head_size in (64, 40):
        b = make_batch(seqs, 8, 2, head_size, 16, cache_dtype, seed=5)
        out = run(simt, dict(b, k_scale=0.37, v_scale=3.0))
        ref = run(simt, b)
        rows = int(b["query_start_loc"][-1])
        assert torch.isfinite(out[:rows]).all()
        assert torch.equal(out[:rows], ref[:rows])
        native = ops_native.paged_attention(**b, k_scale=0.37, v_scale=3.0)
        assert torch.equal(native, ops_native.paged_attention(**b))


def test_fp8_errors(simt):
    b = batch_for([(2, 5), (1, 20)], 4, 2, 32, 16, seed=0)

    def call(**over):
        c = {**b, **over}
        simt.paged_attention(torch.empty_like(c["query"]), c["query"], c["key_cache"], c["value_cache"],
                             c["query_start_loc"], c["seq_lens"], c["block_table"], c["scale"], 0, 0.0, None)

    with pytest.raises(RuntimeError, match="value_cache dtype Float != key_cache dtype Float8_e4m3fn"):
        call(value_cache=b["value_cache"].float())
    with pytest.raises(RuntimeError, match="only float8_e4m3fn caches take another dtype"):
        call(query=b["query"].bfloat16(), key_cache=b["key_cache"].float(), value_cache=b["value_cache"].float())
    with pytest.raises(RuntimeError, match="out dtype"):
        simt.paged_attention(torch.empty_like(b["query"]).bfloat16(), b["query"], b["key_cache"],
                             b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"],
                             b["scale"], 0, 0.0, None)
    key = torch.randn(1, 2, 32)
    with pytest.raises(RuntimeError, match="value_cache dtype Float != key_cache dtype Float8_e4m3fn"):
        simt.reshape_and_cache(key, key, b["key_cache"], b["value_cache"].float(), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="only float8_e4m3fn caches take another dtype"):
        simt.reshape_and_cache(key.bfloat16(), key.bfloat16(), b["key_cache"].float(), b["value_cache"].float(),
                               torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("bad", BAD_SCALES, ids=str)
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_bad_scales(simt, bad, which, fp8):
    # every cache dtype checks the scales, like the CPU kernels and ops_native
    b = batch_for([(2, 5), (1, 20)], 4, 2, 32, 16, seed=0)
    if not fp8:
        b = dict(b, query=b["query"].bfloat16(), key_cache=b["key_cache"].bfloat16(),
                 value_cache=b["value_cache"].bfloat16())
    scales = {"k_scale": 1.0, "v_scale": 1.0, f"{which}_scale": bad}
    match = "k_scale and v_scale must be positive and finite"
    with pytest.raises(RuntimeError, match=f"paged_attention: {match}"):
        run(simt, dict(b, **scales))
    key = torch.randn(1, 2, 32, dtype=b["query"].dtype)
    with pytest.raises(RuntimeError, match=f"reshape_and_cache: {match}"):
        simt.reshape_and_cache(key, key, b["key_cache"], b["value_cache"], torch.zeros(1, dtype=torch.int64),
                               scales["k_scale"], scales["v_scale"])
    with pytest.raises(ValueError, match=match):  # the reference agrees
        ops_native.reshape_and_cache(key, key, b["key_cache"], b["value_cache"],
                                     torch.zeros(1, dtype=torch.int64), **scales)
    with pytest.raises(ValueError, match=match):
        ops_native.paged_attention(**dict(b, **scales))
