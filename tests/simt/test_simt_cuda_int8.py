"""The csrc/cuda INT8 W8A8 GEMM under the SIMT emulator (torch.ops.octavo_simt.int8_gemm) against
octavo.ops_native.int8_gemm: per-token activation quantization (dynamic symmetric, dynamic
asymmetric, static scale with and without a zero point) and the s8 mma.sync m16n8k32 GEMM are
exact in integers and round in fp32 as the reference does, so the outputs must be equal, in
fp32, bf16 and fp16, for the decode (M <= 16) and prefill shapes with M / N / K off the tiles;
on the operands ops_native.int8_prepare makes for the CPU kernel. Also the emulated s8 mma
itself, against a plain integer matmul of the fragments it was given."""
import pytest
import torch

import simt_int_gemm_ext
from octavo import ops_native


@pytest.fixture(scope="module")
def simt():
    return simt_int_gemm_ext.load()


def make_case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * m + 7 * n + k)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = (torch.rand(n, generator=g) + 0.5) / (64 * k ** 0.5)
    x = torch.randn(m, k, generator=g) + 0.3
    return x, wq, ws


def run(simt, x, w, bias=None, asym=False, in_scale=None, in_zp=None):
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype)
    simt.int8_gemm(out, x, w.packed, w.scales, w.colsum, in_scale, in_zp, asym, bias)
    return out


CASES = [(1, 40, 64), (3, 129, 256), (16, 70, 200), (17, 96, 128), (33, 200, 96), (40, 33, 99),
         (300, 48, 64)]
MODES = ["symmetric", "asymmetric", "static", "static-zp"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_int8_gemm(simt, dtype, mode, case):
    m, n, k = CASES[case]
    x, wq, ws = make_case(m, n, k)
    xd = x.to(dtype)
    bias = torch.randn(n).to(dtype) if case % 2 else None
    asym = mode == "asymmetric"
    in_scale = torch.tensor(0.02) if mode.startswith("static") else None
    in_zp = torch.tensor(-3, dtype=torch.int32) if mode == "static-zp" else None
    w = ops_native.int8_prepare(wq, ws)
    out = run(simt, xd, w, bias, asym, in_scale, in_zp)
    ref = ops_native.int8_gemm(xd, wq, ws, bias, asym, in_scale, in_zp)
    assert not out.isnan().any()
    assert torch.equal(out, ref), (f"simt int8 {dtype} {mode} m={m} n={n} k={k}: max diff "
                                   f"{(out.double() - ref.double()).abs().max().item():.3g}")


def test_s8_mma_fragment_layout(simt):
    # one m16n8k32 tile of the extreme codes: with unit scales the fp32 output is the integer
    # product itself (|sum| < 2^24), so a misplaced byte in the emulated fragments, or in the
    # kernel's loads, changes it
    g = torch.Generator().manual_seed(5)
    xq = torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8)
    xq[:, 0] = 127                     # amax 127 for every row: quantization is the identity
    wq = torch.randint(-128, 128, (8, 32), generator=g, dtype=torch.int8)
    w = ops_native.int8_prepare(wq, torch.ones(8))
    out = run(simt, xq.float(), w, in_scale=torch.tensor(1.0))
    assert torch.equal(out.double(), xq.double() @ wq.double().t())


def test_errors(simt):
    x, wq, ws = make_case(3, 40, 64)
    w = ops_native.int8_prepare(wq, ws)
    with pytest.raises(RuntimeError, match="input_zero_point needs input_scale"):
        run(simt, x, w, in_zp=torch.tensor(1))
    with pytest.raises(RuntimeError, match="qweight must be"):
        run(simt, x[:, :32].contiguous(), w)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        simt.int8_gemm(torch.empty(3, 40, dtype=torch.bfloat16), x, w.packed, w.scales, w.colsum,
                       None, None, False, None)
