"""The CUDA gated delta rule (csrc/cuda/gated_delta_rule.cu via octavo.ops) against
octavo.ops_native on a GPU: varlen prefill with slots (the chunked kernel for rows of two or more
tokens), lengths around the chunk size with strong decay, a prefill split over two calls, and the
one-token decode replayed from a captured CUDA graph. Skipped where torch.cuda is unavailable;
tests/simt runs the same kernels under the SIMT emulator."""
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


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kd,per_head_g", [(128, False), (64, True), (256, False)])
def test_chunked_lengths_strong_decay(dtype, kd, per_head_g):
    c = 32 if kd <= 128 else 16  # the kernel's tokens per chunk
    case = make_gdr([c - 1, 1, c, 0, c + 1, 2 * c + 3, 200], 2, kd, 96, dtype,
                    per_head_g=per_head_g, seed=4)
    gen = torch.Generator().manual_seed(5)
    strong = torch.rand(case["g"].shape, generator=gen) < 0.2
    case["g"] = torch.where(strong, -50 - 200 * torch.rand(case["g"].shape, generator=gen),
                            case["g"])
    case = on_gpu(case)
    exact, exact_st = run(ops_native.gated_delta_rule, case, cast=torch.float64)
    native, native_st = run(ops_native.gated_delta_rule, case)
    out, st = run(ops.gated_delta_rule, case)
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")


def test_chunked_prefill_in_two_calls():
    lens, split = [100, 3, 64], [37, 1, 32]
    case = on_gpu(make_gdr(lens, 4, 128, 128, torch.float32, seed=6))
    whole, whole_st = run(ops.gated_delta_rule, case)
    starts = case["query_start_loc"].tolist()
    first = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, split)]).cuda()
    second = torch.cat([torch.arange(s + n, e) for s, n, e in zip(starts, split, starts[1:])])
    st = case["ssm_states"].clone()
    out = torch.empty_like(whole)
    for rows, lens_now in ((first, split), (second.cuda(), [n - m for n, m in zip(lens, split)])):
        qsl = torch.tensor([0] + lens_now, device="cuda").cumsum(0).int()
        out[rows] = ops.gated_delta_rule(*(case[x][rows] for x in ("q", "k", "v", "g", "beta")),
                                         st, qsl, case["state_indices"])
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, whole_st, rtol=1e-5, atol=1e-5)


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
