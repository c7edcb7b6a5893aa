"""The CUDA gated delta rule (csrc/cuda/gated_delta_rule.cu via octavo.ops) against
octavo.ops_native on a GPU: varlen prefill with slots, and the one-token decode replayed from a
captured CUDA graph. Skipped where torch.cuda is unavailable; tests/simt runs the same kernel
under the SIMT emulator."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native
from test_gated_delta_rule import make_gdr, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_gpu(case):
    return {key: val.cuda() for key, val in case.items()}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("h,kd,vd,per_head_g", [(4, 128, 128, False), (2, 13, 37, True)])
def test_varlen_prefill(dtype, h, kd, vd, per_head_g):
    case = on_gpu(make_gdr([70, 1, 0, 33, 1], h, kd, vd, dtype, per_head_g=per_head_g))
    init = torch.tensor([False, True, True, False, True], device="cuda")
    exact, exact_st = run(ops_native.gated_delta_rule, case, init, cast=torch.float64)
    native, native_st = run(ops_native.gated_delta_rule, case, init)
    out, st = run(ops.gated_delta_rule, case, init)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")


def test_decode_graph_replay():
    case = on_gpu(make_gdr([1] * 8, 4, 128, 128, torch.bfloat16, seed=2))
    case["state_indices"][3] = -1
    st = case["ssm_states"].clone()
    args = [case[x] for x in ("q", "k", "v", "g", "beta")]
    graph = torch.cuda.CUDAGraph()
    ops.gated_delta_rule_update(st.clone(), *args, case["state_indices"])  # warm up
    with torch.cuda.graph(graph):
        out = ops.gated_delta_rule_update(st, *args, case["state_indices"])
    fresh = make_gdr([1] * 8, 4, 128, 128, torch.bfloat16, seed=3)
    for x, a in zip(("q", "k", "v", "g", "beta"), args):
        a.copy_(fresh[x])
    before = st.clone()
    graph.replay()
    native_st = before.clone()
    native = ops_native.gated_delta_rule_update(native_st, *args, case["state_indices"])
    exact_st = before.double()
    exact = ops_native.gated_delta_rule_update(exact_st, *(a.double() for a in args),
                                               case["state_indices"])
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
