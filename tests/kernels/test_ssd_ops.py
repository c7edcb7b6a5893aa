"""Mamba-2 SSD ops (ssd_chunk_scan, ssd_state_update): the references vs transformers' Mamba-2
torch path, then octavo.ops (the compiled kernels) vs the references on varlen batches."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, DTYPES, assert_close_to_ref
from octavo import ops, ops_native

INF = float("inf")


def make_ssd(seq_lens, h, p, g, n, dtype, num_slots=None, seed=0, state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    num_slots = num_slots or len(seq_lens) + 2
    x = torch.randn(t, h, p, generator=gen).to(dtype)
    dt = (torch.randn(t, h, generator=gen) - 1.0).to(dtype)
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(t, g, n, generator=gen).to(dtype)
    C = torch.randn(t, g, n, generator=gen).to(dtype)
    D = torch.randn(h, generator=gen)
    dt_bias = torch.randn(h, generator=gen) * 0.5
    states = torch.randn(num_slots, h, p, n, generator=gen).to(state_dtype)
    qsl = torch.tensor([0] + list(torch.tensor(seq_lens).cumsum(0)), dtype=torch.int32)
    # slots in reverse order so that sequence b does not use slot b
    idx = torch.arange(len(seq_lens), dtype=torch.int32).flip(0) + 1
    return dict(x=x, dt=dt, A=A, B=B, C=C, D_skip=D, dt_bias=dt_bias, ssm_states=states,
                query_start_loc=qsl, state_indices=idx)


def run_scan(fn, case, chunk_size=8, dt_softplus=True, dt_limit=(0.0, INF), has_initial_state=None,
             cast=None):
    c = {k: None if v is None else v.clone() for k, v in case.items()}
    if cast is not None:
        for k in ("x", "dt", "A", "B", "C", "D_skip", "dt_bias", "ssm_states"):
            c[k] = None if c[k] is None else c[k].to(cast)
    out = fn(c["x"], c["dt"], c["A"], c["B"], c["C"], chunk_size, c["D_skip"], c["dt_bias"],
             dt_softplus, dt_limit, c["ssm_states"], c["query_start_loc"], c["state_indices"],
             has_initial_state)
    return out, c["ssm_states"]


def check_scan(case, **kw):
    exact, exact_st = run_scan(ops_native.ssd_chunk_scan, case, cast=torch.float64, **kw)
    native, native_st = run_scan(ops_native.ssd_chunk_scan, case, **kw)
    out, st = run_scan(ops.ssd_chunk_scan, case, **kw)
    assert out.dtype == case["x"].dtype and st.dtype == case["ssm_states"].dtype
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    return out, st


# ---- the references vs transformers' Mamba-2 torch path ----------------------------------

@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 19, 32])
def test_reference_matches_transformers_chunk_scan(groups, seq_len):
    mm = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    c = make_ssd([seq_len], 4, 8, groups, 16, torch.float32)
    dt_limit = (0.05, 3.0)
    h0 = c["ssm_states"][1].clone()
    ref, ref_final = mm.mamba2_chunk_scan(
        c["x"][None], c["dt"][None], c["A"], c["B"][None], c["C"][None], 8, D=c["D_skip"],
        dt_bias=c["dt_bias"], initial_states=h0[None], dt_softplus=True, dt_limit=dt_limit,
        return_final_states=True)
    out, st = run_scan(ops_native.ssd_chunk_scan, c, dt_limit=dt_limit, cast=torch.float64)
    torch.testing.assert_close(out.float(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st[1].float(), ref_final[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_reference_matches_transformers_state_update(groups):
    mm = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    c = make_ssd([1] * 3, 4, 8, groups, 16, torch.float32)
    idx = c["state_indices"].long()
    st_ref = c["ssm_states"][idx].clone()
    hp, n = c["x"].shape[2], c["B"].shape[2]  # transformers' mixer expands per head dim
    ref = mm.mamba2_selective_state_update(
        st_ref, c["x"], c["dt"][:, :, None].expand(-1, -1, hp),
        c["A"][:, None, None].expand(-1, hp, n), c["B"], c["C"],
        D=c["D_skip"][:, None].expand(-1, hp), dt_bias=c["dt_bias"][:, None].expand(-1, hp),
        dt_softplus=True)
    st = c["ssm_states"].clone()
    out = ops_native.ssd_state_update(st, c["x"], c["dt"], c["A"], c["B"], c["C"], c["D_skip"],
                                      c["dt_bias"], True, (0.0, INF), c["state_indices"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st[idx], st_ref, rtol=1e-5, atol=1e-5)


def test_reference_hand_computed_two_steps():
    # H=P=N=G=1, no softplus: h1 = dt*x*B; h2 = exp(dt*A)*h1 + dt*x2*B; y = h*C + D*x
    x = torch.tensor([[[2.0]], [[3.0]]])
    dt = torch.tensor([[0.5], [0.25]])
    A, D = torch.tensor([-1.0]), torch.tensor([0.5])
    B = torch.tensor([[[1.5]], [[-1.0]]])
    C = torch.tensor([[[2.0]], [[4.0]]])
    st = torch.zeros(1, 1, 1, 1)
    out = ops_native.ssd_chunk_scan(x, dt, A, B, C, 4, D, None, False, (0.0, INF), st,
                                    torch.tensor([0, 2], dtype=torch.int32),
                                    torch.tensor([0], dtype=torch.int32), None)
    h1 = 0.5 * 2.0 * 1.5
    h2 = torch.exp(torch.tensor(-0.25)).item() * h1 + 0.25 * 3.0 * -1.0
    torch.testing.assert_close(out.flatten(), torch.tensor([h1 * 2 + 1.0, h2 * 4 + 1.5]))
    torch.testing.assert_close(st.flatten(), torch.tensor([h2]))


# ---- octavo.ops (the kernels) vs the references --------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("h,p,g,n", [(4, 8, 1, 16), (6, 12, 3, 13), (2, 64, 2, 32), (3, 5, 1, 7)])
def test_chunk_scan_varlen(dtype, h, p, g, n):
    # prefill chunks longer and shorter than chunk_size mixed with decode rows and an empty one
    seq_lens = [19, 1, 8, 0, 1, 33]
    case = make_ssd(seq_lens, h, p, g, n, dtype)
    init = torch.tensor([False, True, True, True, True, False])
    check_scan(case, has_initial_state=init)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_scan_no_softplus_dt_limit_and_no_optionals(dtype):
    case = make_ssd([7, 12], 4, 8, 2, 16, dtype, seed=3)
    case["D_skip"] = case["dt_bias"] = None
    case["dt"] = case["dt"].abs()
    check_scan(case, dt_softplus=False, dt_limit=(0.2, 0.6))
    out, _ = check_scan(case, dt_softplus=True, dt_limit=(0.05, 0.3))
    unclamped, _ = run_scan(ops.ssd_chunk_scan, case)
    assert (out.float() - unclamped.float()).abs().max() > 1e-2  # the limit changed something


def test_chunk_scan_other_slots_untouched_and_padding_rows():
    case = make_ssd([5, 9, 1], 4, 8, 2, 16, torch.float32, num_slots=8)
    case["state_indices"] = torch.tensor([6, -1, 2], dtype=torch.int32)
    before = case["ssm_states"].clone()
    out, st = check_scan(case)
    untouched = [s for s in range(8) if s not in (6, 2)]
    assert torch.equal(st[untouched], before[untouched])
    assert not torch.equal(st[6], before[6]) and not torch.equal(st[2], before[2])
    assert torch.equal(out[5:14], torch.zeros_like(out[5:14]))  # the padding sequence's rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_carry_equals_one_pass(dtype):
    case = make_ssd([40], 4, 8, 2, 16, dtype, seed=5)
    full, full_st = run_scan(ops.ssd_chunk_scan, case, has_initial_state=torch.tensor([False]))
    st = case["ssm_states"].clone()
    outs = []
    for i, (a, b) in enumerate([(0, 13), (13, 14), (14, 40)]):  # a 1-token piece in between
        piece = dict(case, x=case["x"][a:b], dt=case["dt"][a:b], B=case["B"][a:b],
                     C=case["C"][a:b], ssm_states=st,
                     query_start_loc=torch.tensor([0, b - a], dtype=torch.int32))
        o = ops.ssd_chunk_scan(piece["x"], piece["dt"], piece["A"], piece["B"], piece["C"], 8,
                               piece["D_skip"], piece["dt_bias"], True, (0.0, INF), st,
                               piece["query_start_loc"], piece["state_indices"],
                               torch.tensor([i > 0]))
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st, full_st, rtol=1e-5, atol=1e-5)


def test_chunk_scan_strided_views_and_bf16_states():
    # x, B, C as column views of one conv output row (as the Mamba-2 mixer splits xBC)
    h, p, g, n, t = 4, 8, 2, 16, 11
    base = make_ssd([4, 7], h, p, g, n, torch.bfloat16, state_dtype=torch.bfloat16, seed=9)
    xbc = torch.randn(t, h * p + 2 * g * n + 3).to(torch.bfloat16)
    case = dict(base, x=xbc[:, :h * p].view(t, h, p),
                B=xbc[:, h * p:h * p + g * n].view(t, g, n),
                C=xbc[:, h * p + g * n:h * p + 2 * g * n].view(t, g, n))
    assert not case["x"].is_contiguous()
    check_scan(case)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("g", [1, 2])
def test_state_update_matches_reference_and_scan(dtype, g):
    case = make_ssd([1] * 5, 4, 12, g, 16, dtype, num_slots=9, seed=11)
    case["state_indices"] = torch.tensor([7, 0, -1, 3, 5], dtype=torch.int32)

    def upd(fn, cast=None):
        c = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v.clone())
             for k, v in case.items()}
        o = fn(c["ssm_states"], c["x"], c["dt"], c["A"], c["B"], c["C"], c["D_skip"],
               c["dt_bias"], True, (0.0, 1.5), c["state_indices"])
        return o, c["ssm_states"]

    exact, exact_st = upd(ops_native.ssd_state_update, torch.float64)
    native, native_st = upd(ops_native.ssd_state_update)
    out, st = upd(ops.ssd_state_update)
    assert_close_to_ref(out, native, exact, what="out")
    assert_close_to_ref(st, native_st, exact_st, what="ssm_states")
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(st[[1, 2, 4, 6, 8]], case["ssm_states"][[1, 2, 4, 6, 8]])
    scan, scan_st = run_scan(ops.ssd_chunk_scan, case, dt_limit=(0.0, 1.5))
    torch.testing.assert_close(out, scan, rtol=0, atol=0)
    torch.testing.assert_close(st, scan_st, rtol=0, atol=0)


def test_bad_shapes_raise_value_error():
    case = make_ssd([3], 4, 8, 3, 16, torch.float32)  # 4 heads, 3 groups
    with pytest.raises(ValueError, match="multiple of groups"):
        run_scan(ops.ssd_chunk_scan, case)
    case = make_ssd([3], 4, 8, 2, 16, torch.float32)
    case["ssm_states"] = case["ssm_states"][..., :8]
    with pytest.raises(ValueError, match="ssm_states must be"):
        run_scan(ops.ssd_chunk_scan, case)
    case = make_ssd([3], 4, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="dt_limit"):
        run_scan(ops.ssd_chunk_scan, case, dt_limit=(1.0, 0.5))


@pytest.mark.skipif(ops.USING_NATIVE, reason="OCTAVO_USE_NATIVE_OPS=1: no compiled op to check")
def test_opcheck():
    c = make_ssd([5, 1, 3], 4, 8, 2, 16, torch.float32)
    out = torch.empty_like(c["x"])
    torch.library.opcheck(torch.ops.octavo.ssd_chunk_scan,
                          (out, c["x"], c["dt"], c["A"], c["B"], c["C"], 8, c["D_skip"],
                           c["dt_bias"], True, 0.0, INF, c["ssm_states"], c["query_start_loc"],
                           c["state_indices"], torch.tensor([True, False, True])))
    d = make_ssd([1, 1], 4, 8, 2, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.octavo.ssd_state_update,
                          (torch.empty_like(d["x"]), d["ssm_states"], d["x"], d["dt"], d["A"],
                           d["B"], d["C"], None, d["dt_bias"], True, 0.0, INF,
                           d["state_indices"]))
