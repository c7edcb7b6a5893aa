"""The csrc/cuda weight-only INT8 kernels under the SIMT emulator, on the operands ops_native
prepares for the CPU kernels:
* torch.ops.octavo_simt.int8_woq_gemm against ops_native.int8_woq_gemm: fp32 / bf16 / fp16, M = 1,
  2, 7, 16 (decode shape), 17, 33 and 300 (prefill), N and K off the 32-output unit and the 64-wide
  K tile, groups of 16 / 32 / 128 and per channel, with and without offsets, bias, extreme codes,
  strided x;
* torch.ops.octavo_simt.fused_moe_int8_packed against ops_native.fused_moe_int8 (plain PyTorch in
  the kernel's dtype as the error yardstick): one token, idle experts, all tokens on one expert,
  E = 3 / 5 / 6, top_k = E, I and H off the panels, gate / up and down with different group sizes,
  the decode (few pairs) and prefill shapes, the three activations, no offsets, strided hidden,
  no tokens and top_k = 0;
and the errors the CUDA wrappers raise."""
import pytest
import torch

import simt_int8_woq_ext
from kernel_utils import assert_close_to_ref
from octavo import ops, ops_native
from test_int8_gemm import make_woq
from test_moe import same_precision_moe
from test_moe_int8 import make_int8_moe

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def simt():
    return simt_int8_woq_ext.load()


# ---- dense ---------------------------------------------------------------------------------------

def run_gemm(simt, x, w, bias=None):
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype)
    simt.int8_woq_gemm(out, x, w.packed, w.scales_offsets, w.group_size, bias)
    return out


def check_gemm(simt, m, n, k, dtype, group_size, offsets, bias=False, stride=0, q=None):
    qq, s, off = make_woq(n, k, group_size, offsets, seed=m)
    q = qq if q is None else q
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k + stride, generator=g).to(dtype)[:, stride:]
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    w = ops_native.int8_woq_prepare(q, s, off, group_size)
    out = run_gemm(simt, x, w, b)
    native = ops_native.int8_woq_gemm(x, q, s, off, group_size, b)
    exact = ops_native.int8_woq_gemm(x.double(), q, s, off, group_size, None if b is None else b.double())
    assert not out.isnan().any()
    assert_close_to_ref(out, native, exact, what=f"simt int8 woq {dtype} m={m} n={n} k={k} "
                        f"gs={group_size} offsets={offsets} bias={bias} stride={stride}")


# (M, N, K): decode (M <= 16) and prefill shapes; N and K off the 32-output unit / 64-wide K tile
SHAPES = [(1, 40, 200), (2, 72, 130), (7, 33, 256), (16, 96, 144), (17, 48, 160), (33, 56, 136),
          (300, 40, 144)]
GROUPS = [16, 32, 128, -1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_int8_woq_gemm(simt, shape, group_size, dtype):
    m, n, k = shape
    case = SHAPES.index(shape) + GROUPS.index(group_size)
    check_gemm(simt, m, n, k, dtype, group_size, offsets=case % 2 == 0, bias=case % 3 == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 15, 33, 100])
def test_int8_woq_awkward_k_bias_strided(simt, dtype, k):
    # K below one mma step and off the tile; rows with a stride that is not 16-byte aligned
    check_gemm(simt, 4, 45, k, dtype, 32, True, bias=True, stride=5)
    check_gemm(simt, 20, 45, k, dtype, -1, True, bias=True, stride=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_woq_extreme_codes(simt, dtype):
    # -128 and 127 only: the code conversions (magic exponents) at both ends of the range
    g = torch.Generator().manual_seed(1)
    q = (torch.randint(0, 2, (40, 96), generator=g) * 255 - 128).to(torch.int8)
    for m in (3, 20):
        check_gemm(simt, m, 40, 96, dtype, 32, True, q=q)


def test_int8_woq_errors(simt):
    q, s, off = make_woq(40, 64, 32)
    w = ops_native.int8_woq_prepare(q, s, off, 32)
    x = torch.randn(3, 64)
    out = torch.empty(3, 40)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        simt.int8_woq_gemm(out.double(), x.double(), w.packed, w.scales_offsets, 32, None)
    q8, s8, _ = make_woq(40, 64, 8)
    w8 = ops_native.int8_woq_prepare(q8, s8, None, 8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        simt.int8_woq_gemm(out, x, w8.packed, w8.scales_offsets, 8, None)
    with pytest.raises(RuntimeError, match="qweight must be"):
        simt.int8_woq_gemm(out, x[:, :32], w.packed, w.scales_offsets, 32, None)
    with pytest.raises(RuntimeError, match="scales_offsets must be"):
        simt.int8_woq_gemm(out, x, w.packed, w.scales_offsets[:, :1], 32, None)


# ---- fused MoE -----------------------------------------------------------------------------------

def run_moe(simt, hidden, p, tw, ti, activation="silu"):
    out = torch.full_like(hidden, float("nan"))
    simt.fused_moe_int8_packed(out, hidden, p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets,
                               tw, ti, p.inter_size, p.group_size13, p.group_size2, activation)
    return out


def check_moe(simt, name, dtype, gs13, gs2, offsets=True, activation="silu", stride=0):
    t, h, i, e, k, ids = MOE_CASES[name]
    hidden, w13, w2, tw, ti = make_int8_moe(t, h, i, e, k, gs13, gs2, offsets, dtype,
                                            seed=t + h + i, ids=ids)
    if stride:
        hidden = torch.cat((torch.randn(t, stride).to(dtype), hidden), 1)[:, stride:]
    p = ops.prepare_moe_int8_weights(*w13, *w2, gs13, gs2)
    out = run_moe(simt, hidden, p, tw, ti, activation)
    exact = ops_native.fused_moe_int8(hidden.double(), *w13, *w2, tw, ti, gs13, gs2, activation)
    native = same_precision_moe(hidden, ops_native.moe_int8_dequantize(*w13, gs13).to(dtype),
                                ops_native.moe_int8_dequantize(*w2, gs2).to(dtype), tw, ti, activation)
    assert not out.isnan().any()
    assert_close_to_ref(out, native, exact, what=f"simt fused_moe_int8 {name} {dtype} gs={gs13}/{gs2} "
                        f"offsets={offsets} {activation} stride={stride}")


# (T, H, I, E, k, ids); H and I off the 16-row panel, the 32-output unit and the 64-wide K tile
MOE_CASES = {
    "one-token": (1, 64, 48, 4, 2, None),
    "two-tokens-odd-sizes": (2, 96, 80, 5, 2, None),
    "idle-experts": (3, 96, 72, 8, 1, torch.tensor([[5], [2], [5]])),
    "all-on-one": (7, 80, 96, 4, 1, torch.zeros(7, 1, dtype=torch.long)),
    "e3-topk-equals-e": (7, 130, 200, 3, 3, None),
    "prefill": (48, 144, 88, 6, 2, None),
}
MOE_GROUPS = [(16, 16), (32, 16), (128, 64), (-1, -1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs", MOE_GROUPS, ids=[f"{a}-{b}" for a, b in MOE_GROUPS])
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_fused_moe_int8(simt, name, gs, dtype):
    check_moe(simt, name, dtype, *gs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_int8_activations_no_offsets_strided(simt, activation, dtype):
    check_moe(simt, "two-tokens-odd-sizes", dtype, 32, 16, offsets=False, activation=activation,
              stride=3)
    check_moe(simt, "prefill", dtype, 16, 32, offsets=False, activation=activation, stride=8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_int8_no_tokens_no_experts_chosen(simt, dtype):
    _, w13, w2, _, _ = make_int8_moe(1, 64, 48, 3, 1, 32)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 32)
    empty = torch.empty(0, 64, dtype=dtype)
    out = run_moe(simt, empty, p, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32))
    assert out.shape == (0, 64)
    hidden = torch.randn(3, 64).to(dtype)               # top_k = 0: nothing routed, zeros
    out = run_moe(simt, hidden, p, torch.empty(3, 0), torch.empty(3, 0, dtype=torch.int32))
    assert torch.equal(out, torch.zeros_like(hidden))


def test_fused_moe_int8_errors(simt):
    hidden, w13, w2, tw, ti = make_int8_moe(2, 64, 32, 3, 1, 32)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 32)
    out = torch.empty_like(hidden)
    args = (p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets, tw, ti, 32)
    with pytest.raises(RuntimeError, match="group_size must"):
        simt.fused_moe_int8_packed(out, hidden, *args, 8, 32, "silu")
    with pytest.raises(RuntimeError, match="w2 scales_offsets must be"):
        simt.fused_moe_int8_packed(out, hidden, *args, 32, 16, "silu")
    with pytest.raises(RuntimeError, match="activation"):
        simt.fused_moe_int8_packed(out, hidden, *args, 32, 32, "relu")
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        simt.fused_moe_int8_packed(out.double(), hidden.double(), *args, 32, 32, "silu")
