"""CUDA kernels (rms_norm, fused_add_rms_norm, silu/gelu_and_mul) vs octavo.ops_native on a GPU.
Skipped where torch.cuda is unavailable; the CPU tests cover the same semantics."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 769), (33, 4096), (5, 5125)])
def test_rms_norms_cuda(dtype, num_tokens, hidden):
    torch.manual_seed(0)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.rand(hidden, dtype=dtype, device="cuda") + 0.5
    assert_close_to_ref(ops.rms_norm(x, w, 1e-6), ops_native.rms_norm(x, w, 1e-6),
                        ops_native.rms_norm(x.double(), w.double(), 1e-6))
    xk, rk, xn, rn, xe, re = x.clone(), r.clone(), x.clone(), r.clone(), x.double(), r.double()
    ops.fused_add_rms_norm(xk, rk, w, 1e-6)
    ops_native.fused_add_rms_norm(xn, rn, w, 1e-6)
    ops_native.fused_add_rms_norm(xe, re, w.double(), 1e-6)
    assert_close_to_ref(rk, rn, re)
    assert_close_to_ref(xk, xn, xe)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [1, 769, 2816])
def test_act_and_mul_cuda(dtype, d):
    x = torch.randn(9, 2 * d, dtype=dtype, device="cuda") * 3
    assert_close_to_ref(ops.silu_and_mul(x), ops_native.silu_and_mul(x), ops_native.silu_and_mul(x.double()))
    for approx in ("none", "tanh"):
        assert_close_to_ref(ops.gelu_and_mul(x, approx), ops_native.gelu_and_mul(x, approx),
                            ops_native.gelu_and_mul(x.double(), approx))


def test_opcheck_cuda():
    x = torch.randn(5, 96, device="cuda")
    w = torch.randn(96, device="cuda")
    torch.library.opcheck(torch.ops.octavo.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.octavo.silu_and_mul.default, (torch.empty(5, 48, device="cuda"), x))
