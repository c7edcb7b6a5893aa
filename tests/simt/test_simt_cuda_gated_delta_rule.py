"""The csrc/cuda gated delta rule (a block per (sequence, head, 32 state columns), the state slice
in shared memory) under the SIMT emulator (torch.ops.octavo_simt.gated_delta_rule) against
octavo.ops_native's reference: varlen prefill and one-token decode, state slots, padding,
has_initial_state, one gate per head, tolerances as tests/kernels/test_gated_delta_rule.py."""
import pytest
import torch

import simt_ext
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops_native
from test_gated_delta_rule import make_gdr, run


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def emulated(simt):
    def fn(q, k, v, g, beta, ssm_states, query_start_loc, state_indices, has_initial_state,
           scale=None, use_qk_l2norm=True):
        if g.dim() == 2:  # one gate per head: a stride-0 key dim, as octavo.ops passes it
            g = g.unsqueeze(-1).expand(*q.shape)
        out = torch.full(v.shape, float("nan"), dtype=v.dtype)
        simt.gated_delta_rule(out, q, k, v, g.float(), beta.float(), ssm_states,
                              query_start_loc, state_indices, has_initial_state,
                              q.shape[-1] ** -0.5 if scale is None else scale, use_qk_l2norm)
        return out
    return fn


def check(simt, case, **kw):
    exact, exact_st = run(ops_native.gated_delta_rule, case, cast=torch.float64, **kw)
    native, native_st = run(ops_native.gated_delta_rule, case, **kw)
    out, st = run(emulated(simt), case, **kw)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    return out, st


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("h,kd,vd,per_head_g", [(3, 16, 12, False), (2, 13, 37, True),
                                                (1, 64, 64, False)])
def test_varlen_slots(simt, dtype, h, kd, vd, per_head_g):
    case = make_gdr([9, 1, 0, 5, 1], h, kd, vd, dtype, per_head_g=per_head_g)
    check(simt, case, has_initial_state=torch.tensor([False, True, True, False, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_one_token_per_sequence(simt, dtype):
    """query_start_loc None: the graph-captured decode form (the grid is (B, H, V/32))."""
    case = make_gdr([1, 1, 1, 1], 2, 32, 40, dtype, seed=4)
    case["state_indices"] = torch.tensor([3, -1, 0, 5], dtype=torch.int32)
    native_st = case["ssm_states"].clone()
    native = ops_native.gated_delta_rule_update(native_st, *(case[x] for x in "qkvg"),
                                                case["beta"], case["state_indices"])
    exact_st = case["ssm_states"].double()
    exact = ops_native.gated_delta_rule_update(exact_st, *(case[x].double() for x in "qkvg"),
                                               case["beta"].double(), case["state_indices"])
    st = case["ssm_states"].clone()
    out = torch.full(case["v"].shape, float("nan"), dtype=dtype)
    simt.gated_delta_rule(out, case["q"], case["k"], case["v"], case["g"], case["beta"].float(),
                          st, None, case["state_indices"], None, 32 ** -0.5, True)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    assert torch.equal(out[1], torch.zeros_like(out[1]))      # padding row
    assert torch.equal(st[[1, 2, 4]], case["ssm_states"][[1, 2, 4]])


def test_padding_other_slots_scale_no_l2norm_and_strided_inputs(simt):
    case = make_gdr([4, 6, 2], 2, 8, 8, torch.float32, num_slots=6)
    case["state_indices"] = torch.tensor([4, -1, 1], dtype=torch.int32)
    qk = torch.randn(12, 2, 2, 8)           # q and k as views of one fused buffer
    case["q"], case["k"] = qk[:, :, 0], qk[:, :, 1]
    before = case["ssm_states"].clone()
    out, st = check(simt, case, scale=0.3, use_qk_l2norm=False)
    assert torch.equal(out[4:10], torch.zeros_like(out[4:10]))
    assert torch.equal(st[[0, 2, 3, 5]], before[[0, 2, 3, 5]])


def test_bad_entries_trap(simt):
    """query_start_loc and state_indices are checked by the kernel (a GPU launch must not sync)."""
    case = make_gdr([3, 2], 1, 8, 8, torch.float32, num_slots=3)
    case["state_indices"] = torch.tensor([1, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="state index"):
        run(emulated(simt), case)
    case = make_gdr([3, 2], 1, 8, 8, torch.float32)
    case["query_start_loc"] = torch.tensor([0, 4, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="query_start_loc"):
        run(emulated(simt), case)
