"""rms_norm and fused_add_rms_norm kernels vs octavo.ops_native."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 769), (33, 4096), (5, 5125)])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype, num_tokens, hidden, strided):
    torch.manual_seed(hidden + num_tokens)
    base = torch.randn(num_tokens, hidden + (64 if strided else 0), dtype=dtype) * 3
    x = base[:, :hidden]  # a row-strided view when strided
    w = torch.rand(hidden, dtype=dtype) + 0.5
    out = ops.rms_norm(x, w, 1e-6)
    native = ops_native.rms_norm(x, w, 1e-6)
    exact = ops_native.rms_norm(x.double(), w.double(), 1e-6)
    assert out.dtype == dtype
    assert_close_to_ref(out, native, exact, what="rms_norm")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 769), (33, 4096), (5, 5125)])
def test_fused_add_rms_norm(dtype, num_tokens, hidden):
    torch.manual_seed(hidden)
    x = torch.randn(num_tokens, hidden, dtype=dtype)
    r = torch.randn(num_tokens, hidden, dtype=dtype) * 2
    w = torch.rand(hidden, dtype=dtype) + 0.5
    x_k, r_k = x.clone(), r.clone()
    x_n, r_n = x.clone(), r.clone()
    x_e, r_e = x.double(), r.double()
    assert ops.fused_add_rms_norm(x_k, r_k, w, 1e-5) is None
    ops_native.fused_add_rms_norm(x_n, r_n, w, 1e-5)
    ops_native.fused_add_rms_norm(x_e, r_e, w.double(), 1e-5)
    assert_close_to_ref(r_k, r_n, r_e, what="residual")
    assert_close_to_ref(x_k, x_n, x_e, what="normed")
    # residual is exactly the rounded sum; x is exactly rms_norm of it
    torch.testing.assert_close(r_k, (x.float() + r.float()).to(dtype), rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_rms_norm_residual_rounding(dtype):
    # the residual is the fp32 sum rounded once to nearest even: halfway sums (1 + 2^-9 between
    # bf16's 1 and 1 + 2^-8, odd multiples of the half step), infinities and NaN, in whole
    # vectors and the scalar tail (hidden 16 * 8 + 5)
    hidden = 133
    steps = torch.tensor([2.0 ** -9, 3 * 2.0 ** -9, 2.0 ** -12, 3 * 2.0 ** -12, 1.0, -2.0 ** -9])
    x = steps.repeat(4, hidden // 6 + 1)[:, :hidden].clone()
    r = torch.ones(4, hidden)
    r[1] = -1.0
    r[2] = 256.0
    x[3, 7], r[3, 8], x[3, 9], r[3, 9] = float("nan"), float("inf"), float("inf"), float("-inf")
    x[3, 130], r[3, 131] = float("nan"), float("-inf")
    x, r = x.to(dtype), r.to(dtype)
    r_k = r.clone()
    ops.fused_add_rms_norm(x.clone(), r_k, torch.ones(hidden, dtype=dtype), 1e-5)
    torch.testing.assert_close(r_k, (x.float() + r.float()).to(dtype), rtol=0, atol=0, equal_nan=True)

def test_rms_norm_errors():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.randn(15), 1e-6)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.rms_norm(x.double(), torch.randn(16).double(), 1e-6)
    with pytest.raises(RuntimeError, match="differ"):
        ops.rms_norm(x, torch.randn(16, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(5, 96, dtype=dtype)
    w = torch.randn(96, dtype=dtype)
    torch.library.opcheck(torch.ops.octavo.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.octavo.fused_add_rms_norm.default,
                          (x.clone(), torch.randn_like(x), w, 1e-6))
