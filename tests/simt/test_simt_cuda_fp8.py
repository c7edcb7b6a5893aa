"""The csrc/cuda FP8 GEMM under the SIMT emulator (torch.ops.octavo_simt.fp8_gemm) against
octavo.ops_native.fp8_gemm: the sm_80 path (e4m3 weights widened to bf16/fp16 for mma m16n8k16)
and the sm_89+ path (mma m16n8k32 .e4m3 on e4m3 activations), per-tensor / per-channel / 128 x 128
block scales, M and N off the 16 x 64 tile, K off the k16 / k32 step; plus the emulated e4m3 mma
itself against a plain matmul of the fragments it was given, placed as the PTX ISA lays them out."""
import functools
import os

import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native

SOURCES = ["runtime.cpp", "fp8_kernels.cpp", "torch_ops_simt_fp8.cpp"]


@functools.cache
def _load():
    # an extension of its own beside simt_ext's (same emulator runtime, only the FP8 kernels)
    from torch.utils import cpp_extension
    build_dir = simt_ext.ROOT / "build" / "simt-fp8"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="octavo_simt_fp8", sources=[str(simt_ext.CSRC / "simt" / s) for s in SOURCES],
                       extra_include_paths=[str(simt_ext.CSRC)],
                       extra_cflags=["-std=c++20", "-DOCTAVO_SIMT", "-Wall", "-Wextra", "-Werror", "-O2"],
                       build_directory=str(build_dir), is_python_module=False,
                       verbose=os.environ.get("OCTAVO_SIMT_VERBOSE") == "1")
    return torch.ops.octavo_simt


@pytest.fixture(scope="module")
def simt():
    return _load()


def make_case(m, n, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * m + 7 * n + k)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38                     # no NaN codes
    w = codes.view(torch.float8_e4m3fn)
    block = None
    if kind == "tensor":
        s = torch.rand((), generator=g) / (64 * k ** 0.5) + 1e-4
    elif kind == "channel":
        s = (torch.rand(n, 1, generator=g) + 0.5) / (64 * k ** 0.5)
    else:
        block = (128, 128)
        s = (torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5) / (64 * k ** 0.5)
    x = torch.randn(m, k, generator=g)
    return x, w, s, block


def run(simt, x, w, s, block, dtype, act, fp8_mma, bias=None):
    n, k = w.shape
    scale, bn, bk = ops_native.fp8_scale_blocks(s, n, k, block)
    xq, xs = ops_native.fp8_activations(x.to(dtype), act)
    if xs is not None:
        xq = xq.view(torch.uint8)
    out = torch.full((x.shape[0], n), float("nan"), dtype=dtype)
    simt.fp8_gemm(out, xq, w, scale, bn, bk, xs, bias, fp8_mma)
    return out


CASES = [(1, 40, 64), (5, 70, 100), (17, 129, 260), (33, 64, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("path", ["sm80", "sm80-w8a8", "sm89-w8a8"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_gemm(simt, dtype, kind, path, case):
    m, n, k = CASES[case]
    x, w, s, block = make_case(m, n, k, kind)
    act = None if path == "sm80" else "dynamic"
    xd = x.to(dtype)
    bias = torch.randn(n).to(dtype) if case % 2 else None
    out = run(simt, x, w, s, block, dtype, act, path == "sm89-w8a8", bias)
    native = ops_native.fp8_gemm(xd, w, s, block, bias, act)
    xq, xs = ops_native.fp8_activations(xd, act)
    xe = xq.double() * xs.double()[:, None] if xs is not None else xd.double()
    exact = ops_native.fp8_gemm(xe, w, s, block, None if bias is None else bias.double())
    assert not out.isnan().any()
    assert_close_to_ref(out, native, exact, what=f"simt fp8 {path} {dtype} {kind} m={m} n={n} k={k}")


def test_static_activation_scale(simt):
    x, w, s, block = make_case(9, 48, 96, "channel")
    act = torch.tensor(0.01)
    out = run(simt, x, w, s, block, torch.bfloat16, act, True)
    native = ops_native.fp8_gemm(x.bfloat16(), w, s, block, None, act)
    torch.testing.assert_close(out.float(), native.float(), rtol=2e-2, atol=1e-3)


def test_e4m3_mma_fragment_layout(simt):
    # one m16n8k32 tile of small integers (every sum exact in fp16): entry (i, j) of the output is
    # row i of A against column j of B, so a misplaced byte in the emulated fragments (or in the
    # kernel's loads) changes the product
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (16, 32), generator=g).float().to(torch.float8_e4m3fn)
    b = torch.randint(-3, 4, (8, 32), generator=g).float().to(torch.float8_e4m3fn)
    out = torch.empty(16, 8, dtype=torch.float16)
    simt.fp8_gemm(out, a.view(torch.uint8), b, torch.ones(1, 1), 8, 32, torch.ones(16), None, True)
    assert torch.equal(out.double(), a.double() @ b.double().t())


def test_errors(simt):
    x, w, s, block = make_case(3, 40, 64, "channel")
    scale, bn, bk = ops_native.fp8_scale_blocks(s, 40, 64, block)
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="e4m3 activations"):
        simt.fp8_gemm(out, x.bfloat16(), w, scale, bn, bk, None, None, True)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        simt.fp8_gemm(torch.empty(3, 40), x, w, scale, bn, bk, None, None, False)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        simt.fp8_gemm(out, x.bfloat16().to(torch.float8_e4m3fn).view(torch.uint8), w,
                      torch.ones(40, 4), 1, 16, torch.ones(3), None, True)
