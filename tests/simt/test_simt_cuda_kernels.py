"""The csrc/cuda kernels run under the SIMT emulator (torch.ops.octavo_simt.*) against
octavo.ops_native, with the same tolerance rule as tests/kernels (STYLE habit 9)."""
import pytest
import torch

import simt_ext
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops_native


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def strided(t: torch.Tensor, pad: int) -> torch.Tensor:
    """The same values in a wider buffer, so that rows are not contiguous."""
    wide = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,pad", [(1, 64, 0), (7, 769, 3), (3, 5125, 0), (4, 20, 5),
                                                    (5, 4096, 8)])
def test_rms_norms(simt, dtype, num_tokens, hidden, pad):
    torch.manual_seed(0)
    x = strided(torch.randn(num_tokens, hidden, dtype=dtype), pad)
    r = torch.randn(num_tokens, hidden, dtype=dtype)
    w = torch.rand(hidden, dtype=dtype) + 0.5
    out = torch.empty(num_tokens, hidden, dtype=dtype)
    simt.rms_norm(out, x, w, 1e-6)
    assert_close_to_ref(out, ops_native.rms_norm(x, w, 1e-6),
                        ops_native.rms_norm(x.double(), w.double(), 1e-6), what="rms_norm")
    xk, rk, xn, rn, xe, re = x.clone(), r.clone(), x.clone(), r.clone(), x.double(), r.double()
    xk = strided(xk, pad)
    simt.fused_add_rms_norm(xk, rk, w, 1e-6)
    ops_native.fused_add_rms_norm(xn, rn, w, 1e-6)
    ops_native.fused_add_rms_norm(xe, re, w.double(), 1e-6)
    assert_close_to_ref(rk, rn, re, what="fused_add_rms_norm residual")
    assert_close_to_ref(xk, xn, xe, what="fused_add_rms_norm x")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(9, 1), (5, 769), (3, 2816)])
@pytest.mark.parametrize("pad", [0, 2])  # 2816 with pad 0: 16-byte accesses; pad 2: scalar
def test_act_and_mul(simt, dtype, num_tokens, d, pad):
    torch.manual_seed(1)
    x = strided(torch.randn(num_tokens, 2 * d, dtype=dtype) * 3, pad)
    out = torch.empty(num_tokens, d, dtype=dtype)
    simt.silu_and_mul(out, x)
    assert_close_to_ref(out, ops_native.silu_and_mul(x), ops_native.silu_and_mul(x.double()), what="silu")
    for approx in ("none", "tanh"):
        simt.gelu_and_mul(out, x, approx)
        assert_close_to_ref(out, ops_native.gelu_and_mul(x, approx),
                            ops_native.gelu_and_mul(x.double(), approx), what=f"gelu {approx}")


def test_bad_inputs_are_rejected(simt):
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        simt.silu_and_mul(torch.empty(2, 4, dtype=torch.float64), x)
    with pytest.raises(RuntimeError, match="expected x"):
        simt.silu_and_mul(torch.empty(2, 3), x.float())
