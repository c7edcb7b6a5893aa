"""The CPU linear kernels (out = x @ weight^T + bias; plain and panel-packed weights) vs
octavo.ops_native and an fp64 reference, in every variant this CPU can run (AMX tiles for bf16
with 4 or more rows, avx512_bf16 dot products, the AVX2 panel kernel (also what AVX-512 CPUs
without bf16 dot products run), DEFAULT)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from kernel_utils import ALL_DTYPES, DTYPES, assert_close_to_ref
from octavo import ops, ops_native

SHAPES = [(768, 2304), (769, 5125), (64, 1), (2048, 768), (31, 17), (1, 3)]  # (K, N)


def _case(m, k, n, dtype, bias, stride=0, seed=0):
    g = torch.Generator().manual_seed(seed + 131 * m + 7 * k + n)
    base = torch.randn(m, k + stride, generator=g).to(dtype)
    x = base[:, :k]  # a row-strided view when stride > 0
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _check(x, w, b, what=""):
    out = ops.linear(x, w, b)
    native = ops_native.linear(x, w, b)
    exact = ops_native.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0])
    assert_close_to_ref(out, native, exact, what=what)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 17, 33, 100])  # every block shape
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(dtype, m, k, n, bias):
    _check(*_case(m, k, n, dtype, bias), what=f"linear {dtype} m={m} k={k} n={n} bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_linear_strided_rows(dtype, m):
    x, w, b = _case(m, 769, 133, dtype, True, stride=40)
    assert x.stride(0) == 769 + 40
    _check(x, w, b, what="strided x")
    # out may be a row-strided view too; the columns beyond it stay untouched
    big = torch.full((m, 200), 7.0, dtype=dtype)
    torch.ops.octavo.linear(big[:, :133], x, w, b)
    torch.testing.assert_close(big[:, :133], ops.linear(x.contiguous(), w, b), rtol=0, atol=0)
    assert (big[:, 133:] == 7).all()


def test_linear_matches_torch_bf16_matmul_error():
    # the brief's yardstick: no worse than 2x torch's own bf16 matmul against fp64
    x, w, b = _case(8, 2048, 768, torch.bfloat16, True)
    exact = ops_native.linear(x.double(), w.double(), b.double())
    assert_close_to_ref(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b), exact,
                        what="vs torch bf16")


def test_linear_zero_sizes():
    w = torch.randn(5, 16, dtype=torch.bfloat16)
    assert ops.linear(torch.randn(0, 16, dtype=torch.bfloat16), w).shape == (0, 5)
    b = torch.randn(5, dtype=torch.bfloat16)
    out = ops.linear(torch.randn(3, 0, dtype=torch.bfloat16), w[:, :0].contiguous(), b)
    torch.testing.assert_close(out, b.expand(3, 5), rtol=0, atol=0)


def test_linear_errors():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear(x, torch.randn(8, 15))
    with pytest.raises(RuntimeError, match="differ"):
        ops.linear(x, torch.randn(8, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear(x, torch.randn(16, 8).t())
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(x, torch.randn(8, 16), torch.randn(7))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.linear(x.double(), torch.randn(8, 16).double())
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.octavo.linear(torch.empty(4, 9), x, torch.randn(8, 16), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x = torch.randn(5, 96, dtype=dtype)
    w = torch.randn(33, 96, dtype=dtype)
    b = torch.randn(33, dtype=dtype)
    for bias in (None, b):
        torch.library.opcheck(torch.ops.octavo.linear.default, (torch.empty(5, 33, dtype=dtype), x, w, bias))


VARIANT_SCRIPT = r"""
import torch
from kernel_utils import assert_close_to_ref
from octavo import ops, ops_native
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, k, n in ((1, 769, 133), (3, 64, 1), (7, 2048, 37), (100, 31, 9)):
        g = torch.Generator().manual_seed(m + k + n)
        x = torch.randn(m, k + 8, generator=g).to(dtype)[:, :k]
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        exact = ops_native.linear(x.double(), w.double(), b.double())
        assert_close_to_ref(ops.linear(x, w, b), ops_native.linear(x, w, b), exact, what=f"{dtype} {m} {k} {n}")
        if dtype != torch.float16:
            out = ops.linear_packed(x, ops_native.pack_linear_panels(w), n, b)
            assert_close_to_ref(out, ops_native.linear(x, w, b), exact, what=f"packed {dtype} {m} {k} {n}")
for dtype in (torch.float32, torch.bfloat16):  # every row-block shape of the packed kernels
    for m in (1, 2, 3, 5, 8, 16, 17, 300):
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, 141, generator=g).to(dtype)[:, :133]
        w = (torch.randn(70, 133, generator=g) / 133 ** 0.5).to(dtype)
        b = torch.randn(70, generator=g).to(dtype)
        exact = ops_native.linear(x.double(), w.double(), b.double())
        out = ops.linear_packed(x, ops_native.pack_linear_panels(w), 70, b)
        assert_close_to_ref(out, ops_native.linear(x, w, b), exact, what=f"packed {dtype} m={m}")
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2"),
                                 dict(OCTAVO_CPU_NO_AVX512BF16="1"), dict(OCTAVO_CPU_NO_AMX="1"),
                                 dict(OCTAVO_CPU_AMX_MIN_ROWS="1")],
                         ids=["default", "avx2", "avx512-without-bf16-dot", "avx512-bf16-without-amx",
                              "amx-from-one-row"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def _check_packed(x, w, b, what=""):
    packed = ops_native.pack_linear_panels(w)
    out = ops.linear_packed(x, packed, w.shape[0], b)
    native = ops_native.linear(x, w, b)
    exact = ops_native.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0])
    assert_close_to_ref(out, native, exact, what=what)


PACKED_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
# every row blocking: blocks of up to 6 rows cut evenly (7 = 4 + 3, 11 = 6 + 5, 32 = 6 + 6 + 5 x 4),
# one chunk's prefetch split over 3, 4, 5 and 6 blocks (15, 20, 26, 32), row chunks of 96
# (109 = 96 + 5 + 4 + 4), AMX 16-row blocks and their partial tails
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 15, 16, 17, 20, 26, 32, 33, 100, 109, 300])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_packed(dtype, m, k, n, bias):
    _check_packed(*_case(m, k, n, dtype, bias), what=f"linear_packed {dtype} m={m} k={k} n={n} bias={bias}")


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("m", [1, 8, 300])
def test_linear_packed_long_k(dtype, m):
    # K spans several of the kernels' K chunks (16-32 KiB of weights), with an odd tail
    _check_packed(*_case(m, 4099, 77, dtype, True), what=f"long K {dtype} m={m}")


@pytest.mark.parametrize("m", [32, 48, 64, 80, 47])
@pytest.mark.parametrize("k", [32, 320, 2016, 4096])
def test_linear_packed_row_blocks_through_k_chunks(m, k):
    # AMX (K in whole 32-wide steps): two to four 16-row blocks take turns over each 8-step chunk
    # of K (a partial last chunk at K = 320 and 2016, a single step at 32); the rest one by one
    _check_packed(*_case(m, k, 200, torch.bfloat16, True), what=f"row blocks m={m} k={k}")


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_packed_strided_rows(dtype):
    # (K = 768: the AMX path's own epilogue for K in whole 32-wide steps, 20 rows: a partial block;
    # 40 rows: two whole blocks through K's chunks together, then the partial one)
    for m, k in ((3, 769), (13, 769), (20, 768), (40, 768)):
        x, w, b = _case(m, k, 133, dtype, True, stride=40)
        _check_packed(x, w, b, what="strided x")
        big = torch.full((m, 200), 7.0, dtype=dtype)
        torch.ops.octavo.linear_packed(big[:, :133], x, ops_native.pack_linear_panels(w), b)
        torch.testing.assert_close(big[:, :133], ops.linear_packed(x.contiguous(), ops_native.pack_linear_panels(w), 133, b),
                                   rtol=0, atol=0)
        assert (big[:, 133:] == 7).all()


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_packed_empty_k(dtype):
    b = torch.randn(70, dtype=dtype)
    packed = ops_native.pack_linear_panels(torch.empty(70, 0, dtype=dtype))
    out = ops.linear_packed(torch.empty(3, 0, dtype=dtype), packed, 70, b)
    torch.testing.assert_close(out, b.expand(3, 70), rtol=0, atol=0)


def test_pack_linear_panels_layout():
    w = torch.arange(70 * 5, dtype=torch.float32).view(70, 5).bfloat16()
    packed = ops_native.pack_linear_panels(w)
    assert packed.shape == (2, 3, 64, 2)
    assert packed[0, 1, 3, 0] == w[3, 2] and packed[0, 1, 3, 1] == w[3, 3] and packed[1, 0, 5, 1] == w[69, 1]
    assert packed[0, 2, 0, 1] == 0 and (packed[1, :, 6:] == 0).all()  # K and N padding
    assert torch.equal(ops_native.unpack_linear_panels(packed, 70, 5), w)


def test_linear_packed_errors():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_packed(x, w, 8)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_packed(torch.randn(4, 18, dtype=torch.bfloat16), ops_native.pack_linear_panels(w), 8)
    with pytest.raises(RuntimeError, match="only bfloat16 or float32"):
        ops.linear_packed(x.half(), ops_native.pack_linear_panels(w.half()), 8)
    with pytest.raises(RuntimeError, match="differ"):
        ops.linear_packed(x.float(), ops_native.pack_linear_panels(w), 8)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear_packed(x, ops_native.pack_linear_panels(w), 8, torch.randn(7, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_opcheck_packed(dtype):
    x = torch.randn(5, 97, dtype=dtype)
    w = torch.randn(33, 97, dtype=dtype)
    packed = ops_native.pack_linear_panels(w)
    for bias in (None, torch.randn(33, dtype=dtype)):
        torch.library.opcheck(torch.ops.octavo.linear_packed.default,
                              (torch.empty(5, 33, dtype=dtype), x, packed, bias))


def test_cpu_gemm_packs_bf16_for_the_kernel(monkeypatch):
    from octavo.models.layers import cpu_gemm
    from octavo.models.layers.linear import QKVParallelLinear
    if not cpu_gemm.enabled():
        pytest.skip("cpu_gemm disabled (OCTAVO_CPU_ONEDNN_LINEAR=0 or no oneDNN in this torch)")
    monkeypatch.setenv("OCTAVO_CPU_LINEAR_KERNEL", "1")
    if not cpu_gemm.kernel_enabled(torch.bfloat16):
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has neither avx512_bf16 nor AVX2 "
                    "as its best level: cpu_gemm uses oneDNN (or F.linear) for bf16, not the panel kernel")
    torch.manual_seed(0)
    layer = QKVParallelLinear(96, 16, 4, 2, bias=True, params_dtype=torch.bfloat16)
    for p in layer.parameters():
        p.data.normal_()
    w = layer.weight.detach().clone()
    layer.process_weights_after_loading()
    # one copy: the panels replace the plain weight
    assert isinstance(layer.packed_weight, cpu_gemm.PanelWeight) and layer.weight.numel() == 0
    for rows in (1, 7, 300):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        exact = ops_native.linear(x.double(), w.double(), layer.bias.double())
        assert_close_to_ref(layer(x), ops_native.linear(x, w, layer.bias), exact, what=f"rows={rows}")
    assert layer(torch.randn(0, 96, dtype=torch.bfloat16)).shape == (0, w.shape[0])


def test_cpu_gemm_kernel_switch(monkeypatch):
    # OCTAVO_CPU_LINEAR_KERNEL=0 returns bf16 to oneDNN / F.linear; fp32 stays with oneDNN
    # either way (its prefill GEMM is about 2x the panel kernel's, see cpu_gemm's docstring)
    from octavo.models.layers import cpu_gemm
    if not cpu_gemm.enabled():
        pytest.skip("cpu_gemm disabled (OCTAVO_CPU_ONEDNN_LINEAR=0 or no oneDNN in this torch)")
    w = torch.randn(70, 33)
    monkeypatch.setenv("OCTAVO_CPU_LINEAR_KERNEL", "1")
    assert not cpu_gemm.kernel_enabled(torch.float32)
    assert not isinstance(cpu_gemm.pack(w), cpu_gemm.PanelWeight)
    expect_kernel = not ops.USING_NATIVE and (torch.backends.cpu.get_cpu_capability() == "AVX2"
                                              or cpu_gemm._has_avx512_bf16())
    assert cpu_gemm.kernel_enabled(torch.bfloat16) == expect_kernel
    monkeypatch.setenv("OCTAVO_CPU_LINEAR_KERNEL", "0")
    assert not cpu_gemm.kernel_enabled(torch.bfloat16)
    assert not isinstance(cpu_gemm.pack(w.bfloat16()), cpu_gemm.PanelWeight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_linear_lab_quick(dtype):
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.linear", "--quick", "--dtype", dtype],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and res.stdout.count("OK") == 8  # 2 shapes x 2 rows x 2 kernels
    assert "octavo.linear_packed" in res.stdout
    assert re.search(r"read ceiling [\d.]+ GB/s", res.stdout)
    assert re.search(r"[\d.]+ GB/s \(\s*\d+% of read\)", res.stdout)
