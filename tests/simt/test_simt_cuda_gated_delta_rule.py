"""The csrc/cuda gated delta rule (a block per (sequence, head, 32 state columns), the state slice
in shared memory: the recurrent kernel for one-token rows, the chunked WY / UT-transform kernel
for prefill rows) under the SIMT emulator (torch.ops.octavo_simt.gated_delta_rule) against
octavo.ops_native's reference: varlen prefill and one-token decode, state slots, padding,
has_initial_state, one gate per head, lengths around the chunk size, strong decay, state carried
across calls, tolerances as tests/kernels/test_gated_delta_rule.py."""
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


def chunk_of(kd):
    """The chunked kernel's tokens per chunk (kGdrChunk / kGdrChunkLargeK, by key dim)."""
    return 32 if kd <= 128 else 16


def chunked_reference(q, k, v, g, beta, state, chunk, scale):
    """The chunked form the kernel implements, in float64 torch for one sequence (q/k [L, H, K],
    v [L, H, V], g [L, H, K], beta [L, H], state [H, K, V], l2norm on): per chunk, with b the
    gates summed from its start, A = beta k_s.k_r e^(b_s - b_r) below the diagonal,
    T = (I + A)^-1, U = T (beta v - beta (k e^b) S0), o = (q e^b) S0 + causal(M) U,
    S = e^b_L S0 + (k e^(b_L - b))^T U."""
    def l2norm(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    q, k = l2norm(q.double()) * scale, l2norm(k.double())
    v, g, beta, st = v.double(), g.double(), beta.double(), state.double()
    outs = []
    for c0 in range(0, q.shape[0], chunk):
        qc, kc, vc, bc = (x[c0:c0 + chunk].transpose(0, 1) for x in (q, k, v, beta))  # [H, L, *]
        b = g[c0:c0 + chunk].transpose(0, 1).cumsum(1)                                  # [H, L, K]
        n = b.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, :, :, None]
        decay = torch.exp((b[:, :, None] - b[:, None]).masked_fill(~causal, float("-inf")))
        a = (torch.einsum("htk,hsk,htsk->hts", kc, kc, decay) * bc[..., None]).tril(-1)
        m = torch.einsum("htk,hsk,htsk->hts", qc, kc, decay)
        t = torch.linalg.inv(torch.eye(n, dtype=a.dtype) + a)
        u = t @ (bc[..., None] * (vc - (kc * b.exp()) @ st))
        outs.append(((qc * b.exp()) @ st + m @ u).transpose(0, 1))
        bl = b[:, -1:]
        st = bl.exp().transpose(1, 2) * st + (kc * (bl - b).exp()).transpose(1, 2) @ u
    return torch.cat(outs), st


@pytest.mark.parametrize("per_head_g", [False, True])
def test_chunked_algebra_matches_the_recurrence(per_head_g):
    """The test's own float64 chunked form (chunk 16, 37 tokens) against ops_native's recurrence:
    the decomposition the kernel implements, checked apart from the kernel."""
    case = make_gdr([37], 2, 12, 10, torch.float64, per_head_g=per_head_g, seed=9)
    g = case["g"] if not per_head_g else case["g"][..., None].expand(37, 2, 12)
    out, st = chunked_reference(case["q"], case["k"], case["v"], g, case["beta"],
                                case["ssm_states"][1], 16, 12 ** -0.5)
    ref, ref_st = run(ops_native.gated_delta_rule, case, cast=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, ref_st[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("h,kd,vd,per_head_g", [(2, 16, 40, False), (1, 24, 8, True),
                                                (1, 144, 12, False)])
def test_chunked_prefill_lengths(simt, dtype, h, kd, vd, per_head_g):
    """Prefill rows of C - 1, C, C + 1 and 2C + 3 tokens (C the kernel's chunk) among one-token
    rows and an empty one, with and without initial states."""
    c = chunk_of(kd)
    case = make_gdr([c - 1, 1, c, 0, c + 1, 1, 2 * c + 3], h, kd, vd, dtype,
                    per_head_g=per_head_g, seed=5)
    check(simt, case, has_initial_state=torch.tensor([True, False, False, True, True, True, False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head_g", [False, True])
def test_chunked_strong_decay(simt, dtype, per_head_g):
    """A third of the gates are -50..-250 (e^g underflows to 0): no inf/nan, and the tokens after
    a strong gate keep their small relative decays exact (b is a float plus a remainder)."""
    case = make_gdr([70, 1, 40], 2, 32, 16, dtype, per_head_g=per_head_g, seed=6)
    gen = torch.Generator().manual_seed(7)
    strong = torch.rand(case["g"].shape, generator=gen) < 0.3
    case["g"] = torch.where(strong, -50 - 200 * torch.rand(case["g"].shape, generator=gen),
                            case["g"])
    out, st = check(simt, case)
    assert torch.isfinite(out).all() and torch.isfinite(st).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_state_carries_across_calls(simt, dtype):
    """A batch prefilled in two calls (the second continuing from the states the first left)
    equals one pass: outputs and final states."""
    lens, split = [45, 70, 2], [13, 33, 1]
    case = make_gdr(lens, 2, 24, 20, dtype, seed=8)
    init = torch.tensor([True, False, True])
    whole, whole_st = run(emulated(simt), case, init)
    starts = case["query_start_loc"].tolist()
    first = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, split)])
    second = torch.cat([torch.arange(s + n, e) for s, n, e in zip(starts, split, starts[1:])])
    rest = [n - m for n, m in zip(lens, split)]
    st = case["ssm_states"].clone()
    out = torch.empty_like(whole)
    for rows, lens_now, init_now in ((first, split, init), (second, rest, None)):
        qsl = torch.tensor([0] + lens_now, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out[rows] = emulated(simt)(*(case[x][rows] for x in ("q", "k", "v", "g", "beta")), st,
                                   qsl, case["state_indices"], init_now)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, whole, **tol)
    torch.testing.assert_close(st, whole_st, rtol=1e-5, atol=1e-5)


def test_prefill_rows_run_the_chunked_kernel(simt):
    """Rows of two or more tokens belong to gated_delta_rule_chunk_kernel, one-token rows to the
    recurrent gated_delta_rule_kernel: a bad state index traps in the kernel that owns its row
    (and every test here starts from a NaN-filled out, so no row is left unwritten)."""
    case = make_gdr([1, 5], 1, 8, 8, torch.float32, num_slots=3)
    case["state_indices"] = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="gated_delta_rule_chunk_kernel"):
        run(emulated(simt), case)
    case["state_indices"] = torch.tensor([7, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="gated_delta_rule_kernel<"):
        run(emulated(simt), case)
