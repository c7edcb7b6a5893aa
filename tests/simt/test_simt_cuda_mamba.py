"""The csrc/cuda Mamba-1 kernels (causal conv1d, selective scan, their decode forms) under the
SIMT emulator (torch.ops.octavo_simt.*) against octavo.ops_native, tolerances as tests/kernels."""
import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native
from test_mamba_ops import MIXED_LENS, Batch, _conv_case, _exact, _scan_case, qsl


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def _f32(t):
    return None if t is None else t.float().contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,w", [(40, 4), (19, 2), (130, 3)])
def test_causal_conv1d(simt, dtype, d, w):
    num_slots = 11
    b = Batch(MIXED_LENS, num_slots, seed=d + w, pad=2)
    x, weight, bias, states = _conv_case(b, d, w, dtype, num_slots, strided=True)
    st_kernel, st_native = states.clone(), states.clone()
    out = torch.full_like(x, float("nan"))
    simt.causal_conv1d(out, x, weight, bias, st_kernel, b.q, b.slots, b.init, True)
    native = ops_native.causal_conv1d(x, weight, bias, st_native, b.q, b.slots, b.init)
    exact = ops_native.causal_conv1d(*_exact(x, weight, bias, states), b.q, b.slots, b.init)
    assert torch.isfinite(out).all()   # every row written (the padding sequence's as zeros)
    assert_close_to_ref(out, native, exact, what=f"emulated causal_conv1d {dtype}")
    assert torch.equal(st_kernel, st_native)   # other slots untouched, as in the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_update(simt, dtype):
    d, w, num_slots = 37, 4, 9
    b = Batch([1] * 6, num_slots, seed=5, pad=4)
    x, weight, bias, states = _conv_case(b, d, w, dtype, num_slots, strided=True)
    st_kernel, st_native = states.clone(), states.clone()
    out = torch.full_like(x, float("nan"))
    simt.causal_conv1d_update(out, x, st_kernel, weight, None, b.slots, False)
    native = ops_native.causal_conv1d_update(x, st_native, weight, None, b.slots, None)
    exact = ops_native.causal_conv1d_update(*_exact(x, states), weight.double(), None, b.slots,
                                            None)
    assert_close_to_ref(out, native, exact, what="emulated causal_conv1d_update")
    assert torch.equal(st_kernel, st_native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,n", [(40, 16), (23, 5), (9, 1), (6, 130)])
def test_selective_scan(simt, dtype, d, n):
    num_slots = 12
    b = Batch(MIXED_LENS, num_slots, seed=d * n, pad=6)
    u, delta, A, B, C, D_skip, z, delta_bias, states = _scan_case(b, d, n, dtype, num_slots)
    st_kernel, st_native, st_exact = states.clone(), states.clone(), states.double()
    out = torch.full_like(u, float("nan"))
    simt.selective_scan(out, u, delta, A, B, C, D_skip, z, delta_bias, True, st_kernel, b.q,
                        b.slots, b.init)
    native = ops_native.selective_scan(u, delta, A, B, C, D_skip, z, delta_bias, True, st_native,
                                       b.q, b.slots, b.init)
    exact = ops_native.selective_scan(*_exact(u, delta, A, B, C, D_skip, z, delta_bias), True,
                                      st_exact, b.q, b.slots, b.init)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, native, exact, what=f"emulated selective_scan {dtype}")
    assert_close_to_ref(st_kernel, st_native, st_exact, what="emulated ssm_states")
    keep = b.untouched(num_slots)
    assert torch.equal(st_kernel[keep], states[keep])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_selective_state_update(simt, state_dtype):
    d, n, num_slots = 37, 16, 10
    b = Batch([1] * 7, num_slots, seed=11, pad=3)
    x, dt, A, B, C, D_skip, z, dt_bias, states = _scan_case(b, d, n, torch.bfloat16, num_slots,
                                                            state_dtype=state_dtype)
    st_kernel, st_native = states.clone(), states.clone()
    out = torch.full_like(x, float("nan"))
    simt.selective_state_update(out, st_kernel, x, dt, A, B, C, None, z, dt_bias, True, b.slots)
    native = ops_native.selective_state_update(st_native, x, dt, A, B, C, None, z, dt_bias, True,
                                               b.slots)
    exact = ops_native.selective_state_update(states.double(), *_exact(x, dt, A, B, C), None,
                                              z.double(), dt_bias.double(), True, b.slots)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert_close_to_ref(out, native, exact, what="emulated selective_state_update")
    assert st_kernel.dtype == state_dtype
    torch.testing.assert_close(st_kernel.float(), st_native.float(), atol=1e-2, rtol=1e-2)


def test_chunks_carry_state(simt):
    """Prefill chunks then decode steps through the emulated kernels equal one pass."""
    d, n, w, num_slots, total = 21, 8, 4, 3, 12
    b = Batch([total], num_slots, seed=13, init=torch.tensor([False]))
    x, weight, bias, cstates = _conv_case(b, d, w, torch.float32, num_slots)
    u, delta, A, B, C, D_skip, z, delta_bias, sstates = _scan_case(b, d, n, torch.float32,
                                                                   num_slots)
    cs_ref, ss_ref = cstates.clone(), sstates.clone()
    conv_ref = ops_native.causal_conv1d(x, weight, bias, cs_ref, b.q, b.slots, b.init)
    scan_ref = ops_native.selective_scan(u, delta, A, B, C, D_skip, z, delta_bias, True, ss_ref,
                                         b.q, b.slots, b.init)
    cs, ss = cstates.clone(), sstates.clone()
    conv, scan = torch.empty_like(x), torch.empty_like(u)
    pos = 0
    for i, L in enumerate([2, 5, 3]):
        r = slice(pos, pos + L)
        init = torch.tensor([i > 0])
        simt.causal_conv1d(conv[r], x[r], weight, bias, cs, qsl([L]), b.slots, init, True)
        simt.selective_scan(scan[r], u[r], delta[r], A, B[r], C[r], D_skip, z[r], delta_bias,
                            True, ss, qsl([L]), b.slots, init)
        pos += L
    for t in range(pos, total):
        r = slice(t, t + 1)
        simt.causal_conv1d_update(conv[r], x[r], cs, weight, bias, b.slots, True)
        simt.selective_state_update(scan[r], ss, u[r], delta[r], A, B[r], C[r], D_skip, z[r],
                                    delta_bias, True, b.slots)
    torch.testing.assert_close(conv, conv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scan, scan_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cs, cs_ref, atol=0, rtol=0)
    torch.testing.assert_close(ss, ss_ref, atol=1e-5, rtol=1e-5)


def test_argument_errors(simt):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="conv width"):
        simt.causal_conv1d(torch.empty_like(x), x, torch.randn(8, 17), None,
                           torch.zeros(2, 8, 16), qsl([4]), torch.tensor([0]).int(), None, True)
    with pytest.raises(RuntimeError, match="float32"):
        simt.selective_state_update(torch.empty_like(x), torch.zeros(2, 8, 4), x, x,
                                    torch.randn(8, 4).double(), torch.randn(4, 4),
                                    torch.randn(4, 4), None, None, None, True,
                                    torch.tensor([0, 1, -1, 0]).int())
