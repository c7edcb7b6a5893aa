"""The csrc/cuda Mamba-2 SSD kernel (prefill scan and decode update) under the SIMT emulator
(torch.ops.octavo_simt.*) against octavo.ops_native, tolerances as tests/kernels."""
import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native
from test_ssd_ops import INF, make_ssd, run_scan


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def _f32(t):
    return None if t is None else t.float().contiguous()


def simt_scan(simt):
    def scan(x, dt, A, B, C, chunk_size, D_skip, dt_bias, dt_softplus, dt_limit, ssm_states,
             query_start_loc, state_indices, has_initial_state):
        out = torch.full_like(x, float("nan"))  # unwritten rows show up as NaN
        simt.ssd_chunk_scan(out, x, dt, _f32(A), B, C, chunk_size, _f32(D_skip), _f32(dt_bias),
                            dt_softplus, dt_limit[0], dt_limit[1], ssm_states, query_start_loc,
                            state_indices, has_initial_state)
        return out
    return scan


def check(simt, case, **kw):
    exact, exact_st = run_scan(ops_native.ssd_chunk_scan, case, cast=torch.float64, **kw)
    native, native_st = run_scan(ops_native.ssd_chunk_scan, case, **kw)
    out, st = run_scan(simt_scan(simt), case, **kw)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    return out, st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,p,g,n", [(4, 8, 1, 16), (6, 5, 3, 40), (2, 4, 2, 130)])
def test_chunk_scan_varlen(simt, dtype, h, p, g, n):
    # sequences longer than the 16-token staging chunk, decode rows, an empty one, a fresh start
    case = make_ssd([19, 1, 0, 35, 1], h, p, g, n, dtype)
    check(simt, case, has_initial_state=torch.tensor([False, True, True, True, True]),
          dt_limit=(0.0, 2.0))


def test_chunk_scan_padding_other_slots_and_state_dtype(simt):
    case = make_ssd([5, 3, 4], 4, 8, 2, 16, torch.bfloat16, num_slots=7,
                    state_dtype=torch.bfloat16)
    case["state_indices"] = torch.tensor([5, -1, 0], dtype=torch.int32)
    before = case["ssm_states"].clone()
    case["D_skip"] = None
    out, st = check(simt, case, dt_softplus=False, dt_limit=(0.1, 0.7))
    assert torch.equal(out[5:8], torch.zeros_like(out[5:8]))
    assert torch.equal(st[[1, 2, 3, 4, 6]], before[[1, 2, 3, 4, 6]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update(simt, dtype):
    case = make_ssd([1] * 4, 4, 12, 2, 64, dtype, num_slots=6, seed=4)
    case["state_indices"] = torch.tensor([3, -1, 0, 5], dtype=torch.int32)

    def upd(fn, cast=None):
        c = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v.clone())
             for k, v in case.items()}
        return fn(c, ), c["ssm_states"]

    def simt_upd(c):
        out = torch.full_like(c["x"], float("nan"))
        simt.ssd_state_update(out, c["ssm_states"], c["x"], c["dt"], _f32(c["A"]), c["B"], c["C"],
                              _f32(c["D_skip"]), _f32(c["dt_bias"]), True, 0.0, INF,
                              c["state_indices"])
        return out

    def native_upd(c):
        return ops_native.ssd_state_update(c["ssm_states"], c["x"], c["dt"], c["A"], c["B"],
                                           c["C"], c["D_skip"], c["dt_bias"], True, (0.0, INF),
                                           c["state_indices"])

    exact, exact_st = upd(native_upd, torch.float64)
    native, native_st = upd(native_upd)
    out, st = upd(simt_upd)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_rejects_large_state(simt):
    case = make_ssd([2], 2, 4, 1, 300, torch.float32)
    with pytest.raises(RuntimeError, match="state size"):
        run_scan(simt_scan(simt), case)
