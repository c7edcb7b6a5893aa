"""The INT8 GEMMs vs their references: W8A8 (ops.int8_gemm_prepared: per-channel weight scales,
dynamic per-token symmetric / asymmetric or static activation scales) against the quantize-then-
integer-matmul reference (ops_native.int8_gemm) and hand-computed values; weight-only W8A16
(ops.int8_woq_gemm_prepared: group scales and offsets) against dequantize-then-matmul and an fp64
one; M from 1 to 300, K and N off the 16-output panel and the K pair, every CPU variant."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref, max_err
from octavo import ops, ops_native


def make_w8(n, k, seed=0):
    g = torch.Generator().manual_seed(seed + 1009 * n + k)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) + 0.5) / (64 * k ** 0.5)
    return wq, scales


def _x(m, k, dtype, stride=0, seed=0):
    gen = torch.Generator().manual_seed(seed + m + k)
    x = torch.randn(m, k + stride, generator=gen)
    x[:, 0] *= 4                   # an outlier column, as real activations have
    return x.to(dtype)[:, :k]


def _check_w8a8(m, n, k, dtype, asymmetric=False, static=False, bias=False, stride=0):
    wq, s = make_w8(n, k)
    x = _x(m, k, dtype, stride)
    b = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype) if bias else None
    in_scale = torch.tensor([0.03]) if static else None
    in_zp = torch.tensor([5], dtype=torch.int32) if static and asymmetric else None
    w = ops_native.int8_prepare(wq, s)
    out = ops.int8_gemm_prepared(x, w, b, asymmetric, in_scale, in_zp)
    native = ops_native.int8_gemm(x, wq, s, b, asymmetric, in_scale, in_zp)
    # the same quantized activations, the output math in fp64
    xq, sx, azp = ops_native.int8_quantize_per_token(x, asymmetric, in_scale, in_zp)
    exact = ops_native.int8_scaled_mm(xq, sx, azp, wq, s, None if b is None else b.double(),
                                      torch.float64)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out, native, exact, what=f"int8 {dtype} m={m} n={n} k={k} "
                                                 f"asym={asymmetric} static={static}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 300])
@pytest.mark.parametrize("n,k", [(33, 256), (97, 391), (64, 128)])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_int8_gemm(dtype, m, n, k, asymmetric):
    _check_w8a8(m, n, k, dtype, asymmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_int8_gemm_static_scale_bias_strided(dtype, asymmetric):
    _check_w8a8(6, 50, 130, dtype, asymmetric, static=True, bias=True, stride=10)


@pytest.mark.parametrize("k", [1, 2, 3, 31])
def test_int8_gemm_tiny_k(k):
    _check_w8a8(3, 17, k, torch.float32, asymmetric=k % 2 == 1, bias=True)


def test_int8_gemm_hand_computed():
    # x = [[1, -2, 0.5]]: amax 2 -> xq = round(x * 63.5) = [64, -127, 32], sx = 2/127
    x = torch.tensor([[1.0, -2.0, 0.5]])
    wq = torch.tensor([[1, 2, 3], [-128, 127, 0]], dtype=torch.int8)
    s = torch.tensor([0.5, 0.25])
    xq, sx, azp = ops_native.int8_quantize_per_token(x)
    assert xq.tolist() == [[64, -127, 32]] and azp.tolist() == [0]
    expect = torch.tensor([[(64 - 254 + 96) * 0.5, (-128 * 64 - 127 * 127) * 0.25]]) * (2 / 127)
    w = ops_native.int8_prepare(wq, s)
    torch.testing.assert_close(ops.int8_gemm_prepared(x, w), expect, rtol=1e-6, atol=0)
    # asymmetric: range [-2, 1] -> 255/3 per unit, azp = round(-128 + 2 * 85) = 42
    xq, sx, azp = ops_native.int8_quantize_per_token(x, asymmetric=True)
    assert azp.tolist() == [42] and xq.tolist() == [[127, -128, 84]]   # 42.5 rounds to even
    # and all-zero rows stay exact zeros
    assert ops.int8_gemm_prepared(torch.zeros(2, 3), w, asymmetric=True).abs().max() == 0


def test_int8_gemm_error_vs_float_is_small():
    # what W8A8 is for: per-token int8 activations stay close to the float product
    wq, s = make_w8(64, 512)
    x = _x(4, 512, torch.float32)
    ref = x.double() @ (wq.double() * s.double()[:, None]).t()
    for asym in (False, True):
        out = ops.int8_gemm_prepared(x, ops_native.int8_prepare(wq, s), asymmetric=asym)
        assert max_err(out, ref) < 0.02 * ref.abs().max().item()


def test_pack_int8_panels_round_trip():
    wq, _ = make_w8(45, 99)
    packed = ops_native.pack_int8_panels(wq)
    assert packed.shape == (3, 50, 16, 2) and packed.dtype == torch.int8
    assert packed[1, 3, 5, 1] == wq[21, 7]            # output 16p+j, k = 2kk+i
    assert torch.equal(ops_native.unpack_int8_panels(packed, 45, 99), wq)


def test_int8_gemm_errors():
    wq, s = make_w8(40, 64)
    w = ops_native.int8_prepare(wq, s)
    x, out = torch.randn(2, 64), torch.empty(2, 40)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.octavo.int8_gemm(out, torch.randn(2, 66), w.packed, w.scales, w.colsum,
                                   None, None, False, None)
    with pytest.raises(RuntimeError, match="w_scales"):
        torch.ops.octavo.int8_gemm(out, x, w.packed, w.scales[:3], w.colsum, None, None, False, None)
    with pytest.raises(RuntimeError, match="input_scale must be positive"):
        torch.ops.octavo.int8_gemm(out, x, w.packed, w.scales, w.colsum, torch.tensor([0.0]),
                                   None, False, None)
    with pytest.raises(ValueError, match="int8"):
        ops_native.int8_prepare(wq.float(), s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    wq, s = make_w8(40, 64)
    w = ops_native.int8_prepare(wq, s)
    x = torch.randn(3, 64).to(dtype)
    out = torch.empty(3, 40, dtype=dtype)
    torch.library.opcheck(torch.ops.octavo.int8_gemm,
                          (out, x, w.packed, w.scales, w.colsum, None, None, True,
                           torch.randn(40).to(dtype)))
    q, sc, off = make_woq(40, 64, 32)
    v = ops_native.int8_woq_prepare(q, sc, off, 32)
    torch.library.opcheck(torch.ops.octavo.int8_woq_gemm,
                          (out, x, v.packed, v.scales_offsets, 32, None))


# ---- weight-only W8A16 ---------------------------------------------------------------------

def make_woq(n, k, group_size, offsets=True, seed=0, lo=-128, hi=128):
    g = torch.Generator().manual_seed(seed + 31 * n + k + group_size)
    gs, groups = ops_native.int4_groups(k, group_size)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, groups, generator=g) + 0.5) / (64 * k ** 0.5)
    off = (torch.randn(n, groups, generator=g) * scales * 8) if offsets else None
    return q, scales, off


def _check_woq(m, n, k, dtype, group_size, offsets, bias=False, stride=0):
    q, s, off = make_woq(n, k, group_size, offsets)
    x = _x(m, k, dtype, stride)
    b = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype) if bias else None
    w = ops_native.int8_woq_prepare(q, s, off, group_size)
    out = ops.int8_woq_gemm_prepared(x, w, b)
    native = ops_native.int8_woq_gemm(x, q, s, off, group_size, b)
    exact = ops_native.int8_woq_gemm(x.double(), q, s, off, group_size,
                                     None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out, native, exact,
                        what=f"int8 woq {dtype} m={m} n={n} k={k} gs={group_size} off={offsets}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 300])
@pytest.mark.parametrize("n,k", [(33, 256), (97, 390), (64, 128)])
@pytest.mark.parametrize("group_size", [16, 32, 128, -1])
@pytest.mark.parametrize("offsets", [False, True])
def test_int8_woq_gemm(dtype, m, n, k, group_size, offsets):
    _check_woq(m, n, k, dtype, group_size, offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 31, 33, 100])
def test_int8_woq_awkward_k_bias_strided(dtype, k):
    _check_woq(4, 45, k, dtype, 32, True, bias=True, stride=5)


def test_int8_woq_round_trip_and_hand_computed():
    q, s, off = make_woq(45, 99, 32)
    packed, so = ops_native.pack_int8_woq_panels(q, s, off, 32)
    assert packed.shape == (3, 99, 16) and so.shape == (3, 4, 2, 16)
    assert packed[2, 7, 3] == q[35, 7]
    torch.testing.assert_close(ops_native.unpack_int8_woq_panels(packed, so, 45, 32),
                               ops_native.int8_woq_dequantize(q, s, off, 32))
    qh = torch.tensor([[-128, 127, 3, -1]], dtype=torch.int8)
    w = ops_native.int8_woq_dequantize(qh, torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]]), 2)
    assert w.tolist() == [[-63.0, 64.5, 5.0, -3.0]]


VARIANT_SCRIPT = r"""
import torch
from test_int8_gemm import _check_w8a8, _check_woq
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, n, k in ((1, 33, 256), (4, 70, 129), (9, 64, 384), (300, 40, 64)):
        _check_w8a8(m, n, k, dtype, asymmetric=False, bias=True)
        _check_w8a8(m, n, k, dtype, asymmetric=True, static=m == 4)
        _check_woq(m, n, k, dtype, 32, True, bias=True)
        _check_woq(m, n, k, dtype, -1, False)
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2")],
                         ids=["default", "avx2"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
