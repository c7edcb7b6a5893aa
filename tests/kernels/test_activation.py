"""silu_and_mul and gelu_and_mul kernels vs octavo.ops_native."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

CASES = [("silu", None), ("gelu", "none"), ("gelu", "tanh")]


def _run(mod, kind, approx, x):
    return mod.silu_and_mul(x) if kind == "silu" else mod.gelu_and_mul(x, approx)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind,approx", CASES)
@pytest.mark.parametrize("num_tokens,d", [(1, 1), (7, 769), (16, 2816), (3, 5125)])
def test_act_and_mul(dtype, kind, approx, num_tokens, d):
    torch.manual_seed(d)
    x = torch.randn(num_tokens, 2 * d, dtype=dtype) * 3
    out = _run(ops, kind, approx, x)
    assert out.shape == (num_tokens, d) and out.dtype == dtype
    assert_close_to_ref(out, _run(ops_native, kind, approx, x), _run(ops_native, kind, approx, x.double()),
                        what=f"{kind}/{approx}")



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_extremes(dtype):
    # bf16/fp16 silu takes exp(-x) as a power of two (its own clamps at 2^-125 and 2^127): a sweep
    # through both clamps and past them, and infinities / NaN, match torch's silu times up
    gate = torch.cat([torch.linspace(-130, 130, 1037), torch.tensor([-88.7, -87.3, 86.6, 88.0,
                      float("inf"), float("-inf"), float("nan"), 0.0, -0.0])])
    up = torch.linspace(0.5, 2.0, gate.numel())
    x = torch.cat([gate, up]).to(dtype)[None]
    out, native = ops.silu_and_mul(x), ops_native.silu_and_mul(x)
    exact = ops_native.silu_and_mul(x.double())
    assert torch.equal(out.isnan(), exact.isnan()) and torch.equal(out.isinf(), exact.isinf())
    finite = exact.isfinite()
    assert_close_to_ref(out[finite], native[finite], exact[finite], what="silu extremes")

def test_strided_rows():
    base = torch.randn(9, 2 * 100 + 30)
    x = base[:, : 2 * 100]
    torch.testing.assert_close(ops.silu_and_mul(x), ops_native.silu_and_mul(x))


def test_errors():
    with pytest.raises(RuntimeError, match="approximate"):
        ops.gelu_and_mul(torch.randn(2, 8), "fast")
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.silu_and_mul(torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(5, 2 * 48, dtype=dtype)
    out = torch.empty(5, 48, dtype=dtype)
    torch.library.opcheck(torch.ops.octavo.silu_and_mul.default, (out, x))
    torch.library.opcheck(torch.ops.octavo.gelu_and_mul.default, (out, x, "tanh"))
