"""The FP8 (E4M3) weight GEMM (ops.fp8_gemm, the CPU kernel) vs the dequantize-then-matmul
reference (ops_native.fp8_gemm) and an fp64 one: per-tensor, per-channel and 128 x 128 block
scales, W8A16 and W8A8 (dynamic per-token and static activation scales), M from 1 to 300, K and N
off the kernel's 4-row / vector tiles, in every CPU variant this machine runs."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

SCALES = ["tensor", "channel", "block"]


def make_fp8(n, k, kind, seed=0):
    """Random e4m3 codes [N, K] (every finite code, subnormals included) and scales of `kind`."""
    g = torch.Generator().manual_seed(seed + 1009 * n + k)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3F           # no NaN codes (0x7f / 0xff)
    w = codes.view(torch.float8_e4m3fn)
    block = None
    if kind == "tensor":
        scale = torch.rand((), generator=g) / (64 * k ** 0.5) + 1e-4
    elif kind == "channel":
        scale = (torch.rand(n, 1, generator=g) + 0.5) / (64 * k ** 0.5)
    else:
        block = (128, 128)
        scale = (torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5) / (64 * k ** 0.5)
    return w, scale, block


def _check(m, n, k, dtype, kind, act=None, bias=False, stride=0):
    w, s, block = make_fp8(n, k, kind)
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k + stride, generator=gen).to(dtype)[:, :k]
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    if act == "static":
        act = x.float().abs().amax() / 300      # some values saturate at 448
    out = ops.fp8_gemm(x, w, s, block, b, act)
    native = ops_native.fp8_gemm(x, w, s, block, b, act)
    # fp64 reference on the same quantized activations (their rounding is part of the op)
    xq, xs = ops_native.fp8_activations(x, act)
    xe = xq.double() * xs.double()[:, None] if xs is not None else x.double()
    exact = ops_native.fp8_gemm(xe, w, s, block, None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out, native, exact, what=f"fp8 {dtype} m={m} n={n} k={k} {kind} act={act}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 300])
@pytest.mark.parametrize("n,k", [(33, 256), (97, 390), (130, 300)])
@pytest.mark.parametrize("kind", SCALES)
def test_fp8_gemm(dtype, m, n, k, kind):
    _check(m, n, k, dtype, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 77])
@pytest.mark.parametrize("kind", SCALES)
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_fp8_gemm_w8a8(dtype, m, kind, act):
    _check(m, 70, 270, dtype, kind, act=act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 129, 1000])   # below one vector, a partial last block
def test_fp8_gemm_awkward_k(dtype, k):
    for kind in SCALES:
        _check(3, 45, k, dtype, kind, bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_bias_strided_rows_and_batch_dims(dtype):
    _check(5, 100, 256, dtype, "block", bias=True, stride=24)
    w, s, block = make_fp8(40, 64, "channel")
    x = torch.randn(2, 3, 64).to(dtype)
    torch.testing.assert_close(ops.fp8_gemm(x, w, s), ops_native.fp8_gemm(x, w, s),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_e4m3_decoding_every_code():
    # the kernel's bit-operation decode equals torch's float8_e4m3fn for all 254 finite codes:
    # an identity x picks out each weight exactly
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    codes[(codes & 0x7F) == 0x7F] = 0
    w = codes.view(torch.float8_e4m3fn)
    out = ops.fp8_gemm(torch.eye(16), w, torch.ones(()))
    assert torch.equal(out.t(), w.float())


def test_fp8_dequantize_hand_computed():
    w = torch.tensor([[1.0, -2.0, 0.5], [448.0, 0.015625, -0.001953125]]).to(torch.float8_e4m3fn)
    torch.testing.assert_close(ops_native.fp8_dequantize(w, torch.tensor(2.0)),
                               2 * w.float(), rtol=0, atol=0)
    s = torch.tensor([[0.5], [4.0]])
    torch.testing.assert_close(ops_native.fp8_dequantize(w, s), w.float() * s, rtol=0, atol=0)
    blocks = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    expect = w.float() * torch.tensor([[1.0, 1.0, 3.0], [5.0, 5.0, 7.0]])
    torch.testing.assert_close(ops_native.fp8_dequantize(w, blocks, (1, 2)), expect, rtol=0, atol=0)


def test_fp8_quantize_weight_round_trip():
    w = torch.randn(300, 200)
    q, s = ops_native.fp8_quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (300, 1)
    assert (q.float().abs().amax(1) == 448).all()          # each row's max maps to 448
    rel = ((ops_native.fp8_dequantize(q, s) - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 2 ** -4                                    # 3 mantissa bits
    qb, sb = ops_native.fp8_quantize_weight(w, (128, 128))
    assert sb.shape == (3, 2)
    assert (ops_native.fp8_dequantize(qb, sb, (128, 128)) - w).abs().max() < w.abs().max() / 16


def test_fp8_quantize_act_dynamic_and_static():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0]])
    q, s = ops_native.fp8_quantize_act(x)
    torch.testing.assert_close(s, torch.tensor([4.0 / 448, 1e-12]))
    assert q.float()[0].tolist() == [112.0, -448.0, 224.0]
    q, s = ops_native.fp8_quantize_act(x, torch.tensor(0.001))
    assert q.float()[0].tolist() == [448.0, -448.0, 448.0]   # saturates
    assert s.tolist() == pytest.approx([0.001, 0.001])


def test_fp8_gemm_errors():
    w, s, _ = make_fp8(40, 64, "channel")
    x = torch.randn(2, 64)
    out = torch.empty(2, 40)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.octavo.fp8_gemm(out, torch.randn(2, 66), w, s, 1, 64, None, None)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.octavo.fp8_gemm(out, x, w, s[:20].contiguous(), 1, 64, None, None)
    with pytest.raises(RuntimeError, match="x_scale"):
        torch.ops.octavo.fp8_gemm(out, x, w, s, 1, 64, torch.ones(2), None)
    with pytest.raises(ValueError, match="block scales"):
        ops.fp8_gemm(x, w, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"must\s+be \[1, 1\]"):
        ops.fp8_gemm(x, w, torch.ones(3, 3), (128, 128))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ops.fp8_gemm(x, torch.randn(40, 64), s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    w, s, _ = make_fp8(40, 64, "channel")
    x = torch.randn(3, 64).to(dtype)
    out = torch.empty(3, 40, dtype=dtype)
    torch.library.opcheck(torch.ops.octavo.fp8_gemm,
                          (out, x, w.view(torch.uint8), s.float(), 1, 64, None, torch.randn(40).to(dtype)))
    xq, xs = ops_native.fp8_quantize_act(x)
    torch.library.opcheck(torch.ops.octavo.fp8_gemm,
                          (out, xq.view(torch.uint8), w.view(torch.uint8), s.float(), 1, 64, xs, None))


VARIANT_SCRIPT = r"""
import torch
from test_fp8_gemm import _check
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, n, k, kind in ((1, 33, 256, "tensor"), (8, 70, 129, "channel"), (9, 64, 384, "block"),
                          (300, 40, 200, "block")):
        _check(m, n, k, dtype, kind, bias=True)
        _check(m, n, k, dtype, kind, act="dynamic")
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2")],
                         ids=["default", "avx2"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
