"""Gated delta rule ops (Kimi-Linear's KDA): the references vs transformers' kimi_linear torch
path, then octavo.ops vs the references on varlen batches with state slots."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native


def make_gdr(seq_lens, h, kd, vd, dtype, per_head_g=False, num_slots=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    q = torch.randn(t, h, kd, generator=gen).to(dtype)
    k = torch.randn(t, h, kd, generator=gen).to(dtype)
    v = torch.randn(t, h, vd, generator=gen).to(dtype)
    g = -torch.rand(t, h, *(() if per_head_g else (kd,)), generator=gen) * 0.7
    beta = torch.rand(t, h, generator=gen).to(dtype)
    states = torch.randn(num_slots or len(seq_lens) + 2, h, kd, vd, generator=gen) * 0.5
    qsl = torch.tensor([0] + list(torch.tensor(seq_lens).cumsum(0)), dtype=torch.int32)
    idx = torch.arange(len(seq_lens), dtype=torch.int32).flip(0) + 1
    return dict(q=q, k=k, v=v, g=g, beta=beta, ssm_states=states, query_start_loc=qsl,
                state_indices=idx)


def run(fn, case, has_initial_state=None, cast=None, **kw):
    c = {key: val.clone() for key, val in case.items()}
    if cast is not None:
        for key in ("q", "k", "v", "g", "beta", "ssm_states"):
            c[key] = c[key].to(cast)
    out = fn(c["q"], c["k"], c["v"], c["g"], c["beta"], c["ssm_states"], c["query_start_loc"],
             c["state_indices"], has_initial_state, **kw)
    return out, c["ssm_states"]


def check(case, **kw):
    exact, exact_st = run(ops_native.gated_delta_rule, case, cast=torch.float64, **kw)
    native, native_st = run(ops_native.gated_delta_rule, case, **kw)
    out, st = run(ops.gated_delta_rule, case, **kw)
    assert out.dtype == case["v"].dtype
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    return out, st


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("seq_len", [1, 23, 40])
def test_reference_matches_transformers_kda(form, seq_len):
    km = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    c = make_gdr([seq_len], 3, 16, 12, torch.float32)
    h0 = c["ssm_states"][1].clone()
    args = (c["q"][None], c["k"][None], c["v"][None], c["g"][None], c["beta"][None])
    if form == "chunk":
        ref, ref_final = km.chunk_kimi_delta_attention(
            *args, chunk_size=16, initial_state=h0[None], output_final_state=True,
            use_qk_l2norm_in_kernel=True)
    else:
        ref, ref_final = km.recurrent_kimi_delta_attention(
            *args, initial_state=h0[None], output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, st = run(ops_native.gated_delta_rule, c)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st[1], ref_final[0], rtol=1e-5, atol=1e-5)


def test_reference_hand_computed():
    # H=K=V=1, no l2norm, scale 1: S1 = e^g1 * S0 + k1 (v1 - k1 S0') b1 with S0' = e^g1 S0
    q, k, v = (torch.tensor([[[a]], [[b]]]) for a, b in ((1.0, 2.0), (0.5, -1.0), (3.0, 1.0)))
    g = torch.tensor([[-0.5], [-0.25]])
    beta = torch.tensor([[0.5], [1.0]])
    st = torch.full((1, 1, 1, 1), 2.0)
    out = ops_native.gated_delta_rule(q, k, v, g, beta, st, torch.tensor([0, 2], dtype=torch.int32),
                                      torch.tensor([0], dtype=torch.int32), None, 1.0, False)
    s = 2.0 * torch.exp(torch.tensor(-0.5)).item()
    s = s + 0.5 * (3.0 - 0.5 * s) * 0.5
    o1 = 1.0 * s
    s = s * torch.exp(torch.tensor(-0.25)).item()
    s = s + -1.0 * (1.0 - -1.0 * s) * 1.0
    torch.testing.assert_close(out.flatten(), torch.tensor([o1, 2.0 * s]))
    torch.testing.assert_close(st.flatten(), torch.tensor([s]))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("h,kd,vd,per_head_g", [(3, 16, 12, False), (2, 13, 7, True),
                                                (1, 64, 64, False)])
def test_varlen_slots(dtype, h, kd, vd, per_head_g):
    case = make_gdr([17, 1, 0, 9, 1], h, kd, vd, dtype, per_head_g=per_head_g)
    check(case, has_initial_state=torch.tensor([False, True, True, False, True]))


def test_padding_other_slots_scale_and_no_l2norm():
    case = make_gdr([4, 6, 2], 2, 8, 8, torch.float32, num_slots=6)
    case["state_indices"] = torch.tensor([4, -1, 1], dtype=torch.int32)
    before = case["ssm_states"].clone()
    out, st = check(case, scale=0.3, use_qk_l2norm=False)
    assert torch.equal(out[4:10], torch.zeros_like(out[4:10]))
    assert torch.equal(st[[0, 2, 3, 5]], before[[0, 2, 3, 5]])


def test_chunked_prefill_carry_and_update_equal_one_pass():
    case = make_gdr([30], 2, 16, 8, torch.float32, seed=3)
    full, full_st = run(ops.gated_delta_rule, case, has_initial_state=torch.tensor([False]))
    st = case["ssm_states"].clone()
    outs = []
    for i, (a, b) in enumerate([(0, 11), (11, 29)]):
        sl = {key: case[key][a:b] for key in ("q", "k", "v", "g", "beta")}
        outs.append(ops.gated_delta_rule(sl["q"], sl["k"], sl["v"], sl["g"], sl["beta"], st,
                                         torch.tensor([0, b - a], dtype=torch.int32),
                                         case["state_indices"], torch.tensor([i > 0])))
    outs.append(ops.gated_delta_rule_update(st, *(case[key][29:] for key in ("q", "k", "v", "g", "beta")),
                                            case["state_indices"]))
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, full_st, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise_value_error():
    case = make_gdr([3], 2, 8, 8, torch.float32)
    case["beta"] = case["beta"][:, :1]
    with pytest.raises(ValueError, match="beta must be"):
        run(ops.gated_delta_rule, case)
    case = make_gdr([3], 2, 8, 8, torch.float32)
    case["ssm_states"] = case["ssm_states"].transpose(2, 3)[:, :, :, :4]
    with pytest.raises(ValueError, match="ssm_states must be"):
        run(ops.gated_delta_rule, case)


@pytest.mark.skipif(ops.USING_NATIVE, reason="OCTAVO_USE_NATIVE_OPS=1: no compiled op to check")
def test_opcheck():
    c = make_gdr([4, 1, 3], 2, 8, 8, torch.bfloat16)
    torch.library.opcheck(torch.ops.octavo.gated_delta_rule,
                          (torch.empty_like(c["v"]), c["q"], c["k"], c["v"], c["g"],
                           c["beta"].float(), c["ssm_states"], c["query_start_loc"],
                           c["state_indices"], torch.tensor([True, False, True]), 0.35, True))
    d = make_gdr([1, 1], 2, 8, 8, torch.float32)
    torch.library.opcheck(torch.ops.octavo.gated_delta_rule,
                          (torch.empty_like(d["v"]), d["q"], d["k"], d["v"], d["g"], d["beta"],
                           d["ssm_states"], None, d["state_indices"], None, 0.35, False))
