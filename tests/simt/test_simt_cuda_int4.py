"""The csrc/cuda INT4 weight-only GEMM under the SIMT emulator (torch.ops.octavo_simt.int4_gemm)
against octavo.ops_native.int4_gemm: bf16 and fp16, the decode (M <= 16) and prefill shapes,
M / N / K off the tiles (odd K included), group sizes 32 / 64 / 128 and per channel, symmetric
and with zero points, GPTQ act-order g_idx (activations permuted, as ops.int4_gemm_prepared
does), GGUF-style offsets, bias; on the operands ops_native.int4_prepare makes for the CPU kernel."""
import pytest
import torch

import simt_int_gemm_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native


@pytest.fixture(scope="module")
def simt():
    return simt_int_gemm_ext.load()


def make_case(m, n, k, group_size, zeros, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * m + 7 * n + k)
    gs, groups = ops_native.int4_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, groups, generator=g) + 0.5) / (8 * k ** 0.5)
    z = torch.randint(0, 16, (n, groups), generator=g).float() if zeros else None
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)].int()
    x = torch.randn(m, k, generator=g)
    return x, q, s, z, g_idx


def run(simt, x, w, bias=None):
    x2 = x[:, w.perm] if w.perm is not None else x
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype)
    simt.int4_gemm(out, x2.contiguous(), w.packed, w.scales_offsets, w.group_size, bias)
    return out


CASES = [(1, 40, 64, 32), (3, 129, 256, 64), (16, 70, 200, 128), (17, 96, 128, 32),
         (33, 200, 96, -1), (40, 33, 99, -1), (5, 64, 384, 128), (300, 48, 64, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_int4_gemm(simt, dtype, zeros, case):
    m, n, k, gs = CASES[case]
    x, q, s, z, _ = make_case(m, n, k, gs, zeros)
    bias = torch.randn(n).to(dtype) if case % 2 else None
    w = ops_native.int4_prepare(q, s, z, gs)
    xd = x.to(dtype)
    out = run(simt, xd, w, bias)
    native = ops_native.int4_gemm(xd, q, s, z, gs, None, bias)
    exact = ops_native.int4_gemm(xd.double(), q, s, z, gs, None, None if bias is None else bias.double())
    assert not out.isnan().any()
    assert_close_to_ref(out, native, exact, what=f"simt int4 {dtype} zeros={zeros} m={m} n={n} k={k} gs={gs}")


@pytest.mark.parametrize("m", [1, 20])
def test_act_order(simt, m):
    x, q, s, z, g_idx = make_case(m, 72, 192, 64, True, act_order=True)
    w = ops_native.int4_prepare(q, s, z, 64, g_idx)
    assert w.perm is not None
    xd = x.bfloat16()
    out = run(simt, xd, w)
    native = ops_native.int4_gemm(xd, q, s, z, 64, g_idx)
    exact = ops_native.int4_gemm(xd.double(), q, s, z, 64, g_idx)
    assert_close_to_ref(out, native, exact, what=f"simt int4 act-order m={m}")


def test_offsets(simt):
    # GGUF Q4_1: W = q * scale + min, the min given as an offset
    g = torch.Generator().manual_seed(3)
    n, k = 48, 96
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, 3, generator=g) / 20
    off = -torch.rand(n, 3, generator=g) / 4
    w = ops_native.int4_prepare(q, s, None, 32, offsets=off)
    x = torch.randn(7, k, generator=g).half()
    out = run(simt, x, w)
    wd = (q.double().view(n, 3, 32) * s.double()[..., None] + off.double()[..., None]).view(n, k)
    exact = x.double() @ wd.t()
    native = ops_native.int4_gemm_packed(x, w.packed, w.scales_offsets, n, 32)
    assert_close_to_ref(out, native, exact, what="simt int4 offsets")


def test_strided_x(simt):
    # a row stride that is not 16-byte aligned takes the element-wise loads instead of cp.async
    x, q, s, z, _ = make_case(6, 64, 128, 32, True)
    w = ops_native.int4_prepare(q, s, z, 32)
    xb = torch.randn(6, 131).bfloat16()
    xb[:, 1:129] = x.bfloat16()
    xs = xb[:, 1:129]
    out = torch.empty(6, 64, dtype=torch.bfloat16)
    simt.int4_gemm(out, xs, w.packed, w.scales_offsets, 32, None)
    native = ops_native.int4_gemm(xs, q, s, z, 32)
    exact = ops_native.int4_gemm(xs.double(), q, s, z, 32)
    assert_close_to_ref(out, native, exact, what="simt int4 strided x")


def test_errors(simt):
    x, q, s, z, _ = make_case(3, 40, 64, 32, True)
    w = ops_native.int4_prepare(q, s, z, 32)
    out = torch.empty(3, 40)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        simt.int4_gemm(out, x, w.packed, w.scales_offsets, 32, None)
    w8 = ops_native.int4_prepare(torch.randint(0, 16, (40, 64), dtype=torch.uint8),
                                 torch.rand(40, 8), None, 8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        simt.int4_gemm(torch.empty(3, 40, dtype=torch.bfloat16), x.bfloat16(), w8.packed,
                       w8.scales_offsets, 8, None)
    with pytest.raises(RuntimeError, match="qweight must be"):
        simt.int4_gemm(torch.empty(3, 40, dtype=torch.bfloat16), x[:, :32].bfloat16(), w.packed,
                       w.scales_offsets, 32, None)
