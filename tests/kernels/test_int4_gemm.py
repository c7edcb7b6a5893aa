"""The INT4 weight-only GEMM (ops.int4_gemm_prepared: pack once, then the CPU kernel) vs the
dequantize-then-matmul reference (ops_native.int4_gemm) and an fp64 one: group sizes 32/64/128
and per-channel, with and without zero points, GPTQ act-order g_idx, M from 1 to 300, K and N
off the 32-output panel and the K pair, in every CPU variant this machine runs (bf16 with 8 or more
rows on AMX tiles where the CPU has them; OCTAVO_CPU_NO_AMX=1 checked in a subprocess)."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native


def make_int4(n, k, group_size, zeros, act_order, seed=0):
    """Random codes [N, K], scales / zero points [N, G] and (act-order) a GPTQ-style g_idx."""
    g = torch.Generator().manual_seed(seed + 1009 * n + k + group_size)
    gs, groups = ops_native.int4_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) + 0.5) / (8 * k ** 0.5)
    z = torch.randint(0, 16, (n, groups), generator=g).float() if zeros else None
    g_idx = None
    if act_order:  # GPTQ: column k goes to group (its position in the activation order) // gs
        order = torch.randperm(k, generator=g)
        g_idx = (torch.argsort(order) // gs).to(torch.int32)
    return q, scales, z, g_idx


def _check(m, n, k, dtype, group_size, zeros, act_order, bias=False, stride=0, shift=0.0):
    q, s, z, g_idx = make_int4(n, k, group_size, zeros, act_order)
    gen = torch.Generator().manual_seed(m + n + k)
    x = (torch.randn(m, k + stride, generator=gen) + shift).to(dtype)[:, :k]
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    w = ops_native.int4_prepare(q, s, z, group_size, g_idx)
    out = ops.int4_gemm_prepared(x, w, b)
    native = ops_native.int4_gemm(x, q, s, z, group_size, g_idx, b)
    exact = ops_native.int4_gemm(x.double(), q, s, z, group_size, g_idx,
                                 None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out, native, exact,
                        what=f"int4 {dtype} m={m} n={n} k={k} gs={group_size} zp={zeros} g_idx={act_order}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 300])
@pytest.mark.parametrize("n,k", [(33, 256), (97, 390), (64, 128)])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zeros", [False, True])
def test_int4_gemm(dtype, m, n, k, group_size, zeros):
    _check(m, n, k, dtype, group_size, zeros, act_order=False)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_int4_gemm_decode_rows(dtype, m, group_size):
    # every decode batch size; K = 200 leaves a partial last group and a tail off the 16-wide
    # group sums, and x with a large mean makes the zero-point term (offset * sum x) dominate
    _check(m, 45, 200, dtype, group_size, True, act_order=False, bias=True, shift=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zeros", [False, True])
def test_int4_gemm_act_order(dtype, m, group_size, zeros):
    _check(m, 70, 384, dtype, group_size, zeros, act_order=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 31, 33, 100])  # odd K, K below one group, a partial last group
def test_int4_gemm_awkward_k(dtype, k):
    for gs in (32, -1):
        _check(4, 45, k, dtype, gs, True, act_order=False, bias=True)


@pytest.mark.parametrize("m", [8, 9, 16, 17, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("k,group_size", [(129, 32), (129, -1), (200, 64), (390, 128), (96, 16),
                                          (31, -1), (1, -1)])
def test_int4_gemm_amx_shapes(m, k, group_size):
    # bf16 with 8 or more rows: AMX tiles where the CPU has them (one or two 16-row tiles per
    # block, K zero padded to 32-wide steps, a 1-column last group); groups of 16 keep vdpbf16ps
    _check(m, 45, k, torch.bfloat16, group_size, True, act_order=False, bias=True, shift=4.0)


def test_int4_gemm_amx_row_chunks():
    # 600 rows of K = 2048: three 256-row chunks, each panel expanded once per chunk
    _check(600, 70, 2048, torch.bfloat16, 128, True, act_order=False, bias=True)
    _check(600, 40, 2048, torch.bfloat16, 64, False, act_order=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemm_bias_and_strided_rows(dtype):
    _check(5, 100, 256, dtype, 64, True, act_order=False, bias=True, stride=24)


def test_pack_int4_panels_round_trip():
    # the packed layout stands for exactly the weight it was packed from
    q, s, z, _ = make_int4(45, 99, 32, True, False)
    packed, so = ops_native.pack_int4_panels(q, s, -z * s, 32)
    assert packed.shape == (2, 50, 32) and packed.dtype == torch.uint8 and so.shape == (2, 4, 2, 32)
    w = ops_native.int4_dequantize(q, s, z, 32)
    torch.testing.assert_close(ops_native.unpack_int4_panels(packed, so, 45, 99, 32), w,
                               rtol=1e-6, atol=1e-7)
    # byte 2j+i of K-pair row kk: output j's code of k = 2kk+i (low nibble), output j+16's (high)
    assert packed[0, 3, 2 * 5 + 1] == q[5, 7] | (q[21, 7] << 4)


needs_extension = pytest.mark.skipif(ops.USING_NATIVE, reason="octavo._C is not built: ops.pack_int4_panels "
                                     "is the reference itself")


@needs_extension
@pytest.mark.parametrize("n,k,group_size", [(1, 1, -1), (31, 2, -1), (32, 64, 32), (45, 99, 32),
                                          (100, 256, 128), (7, 257, 64)])
def test_pack_int4_panels_cpp_matches_reference(n, k, group_size):
    # ops.pack_int4_panels (the C++ pass used at load) writes the reference's exact bytes, padding
    # included, from strided codes and scales too
    q, s, z, _ = make_int4(n, k, group_size, True, False)
    offsets = -z * s
    ref = ops_native.pack_int4_panels(q, s, offsets, group_size)
    got = ops.pack_int4_panels(q, s, offsets, group_size)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    wide = torch.zeros(n, k + 5, dtype=torch.int16)          # int16 codes with a row stride
    wide[:, :k] = q
    s_t, o_t = s.t().contiguous().t(), offsets.t().contiguous().t()   # column-major scales
    got = ops.pack_int4_panels(wide[:, :k], s_t, o_t, group_size)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@needs_extension
def test_pack_int4_panels_cpp_codes_above_15_and_prepare():
    # codes are not masked (the reference ORs them as they are), and ops.int4_prepare (act order
    # included) gives ops_native.int4_prepare's weight
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (40, 70), generator=g, dtype=torch.uint8)
    s = torch.rand(40, 3, generator=g)
    o = torch.rand(40, 3, generator=g)
    ref = ops_native.pack_int4_panels(q, s, o, 32)
    got = ops.pack_int4_panels(q, s, o, 32)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    q, s, z, g_idx = make_int4(64, 128, 32, True, True)
    a, b = ops.int4_prepare(q, s, z, 32, g_idx), ops_native.int4_prepare(q, s, z, 32, g_idx)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales_offsets, b.scales_offsets)
    assert torch.equal(a.perm, b.perm) and (a.n, a.k, a.group_size) == (b.n, b.k, b.group_size)
    with pytest.raises(ValueError, match="scales and offsets must be"):
        ops.pack_int4_panels(q, s[:, :2], s[:, :2], 32)


def test_int4_dequantize_hand_computed():
    q = torch.tensor([[0, 15, 8, 3]], dtype=torch.uint8)
    s = torch.tensor([[0.5, 2.0]])
    z = torch.tensor([[1.0, 4.0]])
    expect = torch.tensor([[(0 - 1) * 0.5, (15 - 1) * 0.5, (8 - 4) * 2.0, (3 - 4) * 2.0]])
    torch.testing.assert_close(ops_native.int4_dequantize(q, s, z, 2), expect)
    # symmetric: zero point 8; g_idx picks the group per column
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    expect = torch.tensor([[(0 - 8) * 2.0, (15 - 8) * 0.5, (8 - 8) * 2.0, (3 - 8) * 0.5]])
    torch.testing.assert_close(ops_native.int4_dequantize(q, s, None, 2, g_idx), expect)


def test_int4_act_order_rejects_uneven_groups():
    with pytest.raises(ValueError, match="group_size"):
        ops_native.int4_act_order(torch.tensor([0, 0, 0, 1], dtype=torch.int32), 4, 2)


def test_int4_gemm_errors():
    q, s, z, _ = make_int4(40, 64, 32, True, False)
    w = ops_native.int4_prepare(q, s, z, 32)
    x = torch.randn(2, 64)
    out = torch.empty(2, 40)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.octavo.int4_gemm(out, torch.randn(2, 66), w.packed, w.scales_offsets, 32, None)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.octavo.int4_gemm(out, x, w.packed, w.scales_offsets, 31, None)
    with pytest.raises(RuntimeError, match="scales_offsets"):
        torch.ops.octavo.int4_gemm(out, x, w.packed, w.scales_offsets[:, :1].contiguous(), 32, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, s, z, _ = make_int4(40, 64, 32, True, False)
    w = ops_native.int4_prepare(q, s, z, 32)
    x = torch.randn(3, 64).to(dtype)
    out = torch.empty(3, 40, dtype=dtype)
    torch.library.opcheck(torch.ops.octavo.int4_gemm,
                          (out, x, w.packed, w.scales_offsets, 32, torch.randn(40).to(dtype)))


VARIANT_SCRIPT = r"""
import torch
from test_int4_gemm import _check
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, n, k, gs in ((1, 33, 256, 32), (8, 70, 129, -1), (9, 64, 384, 128), (300, 40, 64, 64),
                        (33, 45, 129, 32)):
        _check(m, n, k, dtype, gs, True, act_order=False, bias=True)
        _check(m, n, k if k % 2 == 0 else k + 1, dtype, gs, False, act_order=gs != -1)
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2"),
                                 dict(OCTAVO_CPU_NO_AVX512BF16="1"), dict(OCTAVO_CPU_NO_AMX="1")],
                         ids=["default", "avx2", "avx512-without-bf16-dot", "avx512-bf16-without-amx"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]

