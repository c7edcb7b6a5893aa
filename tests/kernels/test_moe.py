"""MoE ops (topk_routing, moe_align, fused_moe): the references vs independent computations
(transformers' routers and experts, a dense per-token einsum), then octavo.ops vs the references
(bf16 chunks of 4 or more rows on AMX tiles where the CPU has them; OCTAVO_CPU_NO_AMX=1 checked
in a subprocess)."""
import pytest
import torch
import torch.nn.functional as F

from kernel_utils import ALL_DTYPES, DTYPES, assert_close_to_ref
from octavo import ops, ops_native

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def dense_moe(hidden, w13, w2, topk_weights, topk_ids, activation="silu"):
    """Every token gathers its experts' weights and runs them with einsums, in fp64."""
    i = w13.shape[1] // 2
    ids = topk_ids.long()
    gate_up = torch.einsum("th,tkih->tki", hidden.double(), w13.double()[ids])
    inter = ACTS[activation](gate_up[..., :i]) * gate_up[..., i:]
    y = torch.einsum("tki,tkhi->tkh", inter, w2.double()[ids])
    return (y * topk_weights.double()[..., None]).sum(1)


def make_moe(t, h, i, e, k, dtype, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(t, k, generator=g) + 0.1
    return hidden, w13, w2, weights.float(), ids.to(torch.int32)


# ---- references vs independent computations ------------------------------------------------

def test_topk_routing_hand_computed():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 0.0]])
    w, ids = ops_native.topk_routing(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[3, 2], [0, 1]]  # the tie in row 1: lower ids first
    torch.testing.assert_close(w, torch.stack([p[0, [3, 2]], p[1, [0, 1]]]))
    w, _ = ops_native.topk_routing(logits, 2, renormalize=True, routed_scaling_factor=2.5)
    e3, e2 = torch.tensor(3.0).exp(), torch.tensor(2.0).exp()
    torch.testing.assert_close(w[0], 2.5 * torch.stack([e3, e2]) / (e3 + e2))
    # sigmoid + bias: the bias picks expert 0, the weight stays sigmoid(0) = 0.5
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])
    w, ids = ops_native.topk_routing(logits, 1, "sigmoid", renormalize=False, bias=bias)
    assert ids[:, 0].tolist() == [0, 0]
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 0]))


def _sorted_by_id(w, ids):
    order = ids.long().argsort(-1)
    return w.gather(1, order), ids.long().gather(1, order)


@pytest.mark.parametrize("norm", [True, False])
def test_topk_routing_matches_transformers_deepseek_v3(norm):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4,
                                        n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                        norm_topk_prob=norm)
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(37, 32)
    logits, ref_w, ref_ids = router(x)
    w, ids = ops_native.topk_routing(logits, 4, "sigmoid", norm, router.e_score_correction_bias,
                                     n_group=4, topk_group=2, group_score="top2_sum",
                                     routed_scaling_factor=2.5)
    w, ids = _sorted_by_id(w, ids)
    ref_w, ref_ids = _sorted_by_id(ref_w, ref_ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_topk_routing_matches_transformers_mixtral():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    cfg = transformers.MixtralConfig(hidden_size=24, num_local_experts=7, num_experts_per_tok=3)
    router = MixtralTopKRouter(cfg)
    torch.manual_seed(1)
    router.weight.data.normal_()
    logits, ref_w, ref_ids = router(torch.randn(29, 24))
    w, ids = ops_native.topk_routing(logits, 3)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_topk_routing_group_limited_greedy_per_token():
    # DeepSeek-V2: softmax, groups ranked by their best expert, top-k inside the kept groups
    torch.manual_seed(2)
    logits = torch.randn(11, 12)
    w, ids = ops_native.topk_routing(logits, 3, renormalize=False, n_group=4, topk_group=2,
                                     routed_scaling_factor=1.5)
    for t in range(11):
        p = torch.softmax(logits[t], -1).tolist()
        best = sorted(range(4), key=lambda gi: -max(p[3 * gi:3 * gi + 3]))[:2]
        cand = sorted((e for gi in best for e in range(3 * gi, 3 * gi + 3)), key=lambda e: -p[e])[:3]
        assert ids[t].tolist() == cand
        torch.testing.assert_close(w[t], 1.5 * torch.tensor([p[e] for e in cand]))


def test_topk_routing_errors():
    x = torch.randn(3, 8)
    for kwargs, msg in [(dict(top_k=9), "top_k"), (dict(top_k=2, scoring="relu"), "scoring"),
                        (dict(top_k=2, n_group=3), "n_group"),
                        (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
                        (dict(top_k=5, n_group=4, topk_group=2), "top_k"),
                        (dict(top_k=2, bias=torch.zeros(7)), "bias"),
                        (dict(top_k=2, group_score="mean", n_group=2), "group_score")]:
        for mod in (ops_native, ops):
            with pytest.raises(ValueError, match=msg):
                mod.topk_routing(x, **kwargs)


def check_align(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad):
    """The invariants of moe_align, checked pair by pair."""
    n = topk_ids.numel()
    flat = topk_ids.flatten().tolist()
    p, nblocks = ops_native.moe_align_sizes(n, num_experts, block_size)
    assert sorted_ids.shape == (p,) and expert_ids.shape == (nblocks,) and post_pad.shape == (1,)
    assert sorted_ids.dtype == expert_ids.dtype == post_pad.dtype == torch.int32
    counts = [flat.count(e) for e in range(num_experts)]
    total = sum(-(-c // block_size) * block_size for c in counts)
    assert post_pad.item() == total
    s, ex = sorted_ids.tolist(), expert_ids.tolist()
    assert all(v == n for v in s[total:]) and all(v == -1 for v in ex[total // block_size:])
    seen = []
    for b in range(total // block_size):
        tile = [v for v in s[b * block_size:(b + 1) * block_size] if v != n]
        assert tile and all(flat[v] == ex[b] for v in tile)
        seen += tile
    assert sorted(seen) == list(range(n))
    assert ex[:total // block_size] == sorted(ex[:total // block_size])  # experts in id order


@pytest.mark.parametrize("t,k,e,block", [(1, 1, 4, 16), (13, 2, 5, 4), (64, 8, 8, 16),
                                         (9, 3, 3, 1), (0, 2, 4, 8)])
def test_moe_align_reference(t, k, e, block):
    torch.manual_seed(t)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int() if t else torch.zeros(0, k).int()
    check_align(ids, e, block, *ops_native.moe_align(ids, e, block))


def test_moe_align_hand_computed():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], dtype=torch.int32)
    s, ex, pp = ops_native.moe_align(ids, 4, 2)
    # pairs t*2+j: expert 0 has 1, 4; expert 1 has 3 (+pad 6); expert 2 has 0, 2, 5 (+pad)
    assert s.tolist()[:8] == [1, 4, 3, 6, 0, 2, 5, 6] and ex.tolist()[:4] == [0, 1, 2, 2]
    assert pp.tolist() == [8]


@pytest.mark.parametrize("activation", list(ACTS))
def test_fused_moe_reference_vs_dense(activation):
    hidden, w13, w2, tw, ti = make_moe(9, 40, 24, 6, 2, torch.float64)
    out = ops_native.fused_moe(hidden, w13, w2, tw, ti, activation)
    torch.testing.assert_close(out, dense_moe(hidden, w13, w2, tw, ti, activation))


def test_fused_moe_reference_vs_transformers_experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
    cfg = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=20, n_routed_experts=5)
    experts = DeepseekV3Experts(cfg)
    hidden, w13, w2, tw, ti = make_moe(17, 32, 20, 5, 3, torch.float32, seed=3)
    experts.gate_up_proj.data.copy_(w13)
    experts.down_proj.data.copy_(w2)
    with torch.no_grad():
        ref = experts(hidden, ti.long(), tw)
    torch.testing.assert_close(ops_native.fused_moe(hidden, w13, w2, tw, ti), ref, rtol=1e-5, atol=1e-5)


def test_fused_moe_errors():
    hidden, w13, w2, tw, ti = make_moe(3, 16, 8, 4, 2, torch.float32)
    bad = [((hidden, w13, w2, tw, ti, "relu"), "activation"),
           ((hidden, w13, w2[:, :, :4], tw, ti, "silu"), "w2"),
           ((hidden, w13, w2, tw.double(), ti, "silu"), "topk_weights"),
           ((hidden, w13, w2, tw, ti.long(), "silu"), "int32"),
           ((hidden, w13, w2, tw, ti + 4, "silu"), "expert ids")]
    for args, msg in bad:
        for mod in (ops_native, ops):
            with pytest.raises(ValueError, match=msg):
                mod.fused_moe(*args)


# ---- octavo.ops (the compiled kernels) vs the references -----------------------------------

ROUTING_CASES = [
    dict(top_k=2),                                                     # Mixtral
    dict(top_k=4, renormalize=False),                                  # Qwen2-MoE
    dict(top_k=6, renormalize=False, n_group=3, topk_group=2, routed_scaling_factor=16.0),
    dict(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
         routed_scaling_factor=2.5, bias=True),                        # DeepSeek-V3 / GLM-4.5
    dict(top_k=3, bias=True),                                          # ERNIE (softmax + bias)
    dict(top_k=12),                                                    # top_k = E
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(ROUTING_CASES)))
@pytest.mark.parametrize("t", [1, 37])
def test_topk_routing_kernel(dtype, case, t):
    kw = dict(ROUTING_CASES[case])
    g = torch.Generator().manual_seed(case + t)
    if kw.pop("bias", False):
        kw["bias"] = torch.randn(12, generator=g) * 0.2
    logits = (torch.randn(t, 12, generator=g) * 2).to(dtype)
    w, ids = ops.topk_routing(logits, **kw)
    ref_w, ref_ids = ops_native.topk_routing(logits, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_topk_routing_kernel_bf16_bias_and_strided_logits():
    g = torch.Generator().manual_seed(7)
    bias = (torch.randn(16, generator=g) * 0.3).bfloat16()
    logits = torch.randn(9, 40, generator=g)[:, 3:19]  # a row-strided view
    kw = dict(scoring="sigmoid", bias=bias, n_group=4, topk_group=2, group_score="top2_sum")
    w, ids = ops.topk_routing(logits, 4, **kw)
    ref_w, ref_ids = ops_native.topk_routing(logits, 4, **kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_topk_routing_kernel_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 0.0]])
    w, ids = ops.topk_routing(logits, 4)
    assert ids.tolist() == [[1, 2, 3, 0]]
    # groups (0, 1) and (2, 3) tie on their max: the lower group is kept
    _, ids = ops.topk_routing(logits, 2, n_group=3, topk_group=1)
    assert ids.tolist() == [[1, 0]]
    for mod in (ops, ops_native):
        assert mod.topk_routing(logits, 2, n_group=3, topk_group=1)[1].tolist() == [[1, 0]]


@pytest.mark.parametrize("t,k,e,block", [(1, 1, 4, 16), (13, 2, 5, 4), (64, 8, 8, 16),
                                         (9, 3, 3, 1), (0, 2, 4, 8), (40, 1, 6, 64)])
def test_moe_align_kernel(t, k, e, block):
    g = torch.Generator().manual_seed(t + k)
    ids = (torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t
           else torch.zeros(0, k, dtype=torch.long)).int()
    out = ops.moe_align(ids, e, block)
    check_align(ids, e, block, *out)
    for a, b in zip(out, ops_native.moe_align(ids, e, block)):
        assert torch.equal(a, b)


def same_precision_moe(hidden, w13, w2, topk_weights, topk_ids, activation="silu"):
    """Plain PyTorch in the inputs' dtype (every op rounds): the error yardstick of habit 9."""
    i = w13.shape[1] // 2
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j, e in enumerate(topk_ids[t].tolist()):
            gu = F.linear(hidden[t:t + 1], w13[e])
            y = F.linear(ACTS[activation](gu[:, :i]) * gu[:, i:], w2[e])
            out[t] += (y * topk_weights[t, j].to(hidden.dtype))[0]
    return out


# (T, H, I, E, k, ids): one token, experts that get no token, all tokens on one expert,
# E not a power of two, top_k = E, I and H not multiples of the 64-wide panel, odd H and I
MOE_CASES = {
    "one-token": (1, 64, 64, 4, 2, None),
    "idle-experts": (3, 96, 80, 8, 1, torch.tensor([[5], [2], [5]])),
    "all-on-one": (20, 128, 96, 4, 1, torch.zeros(20, 1, dtype=torch.long)),
    "all-on-one-pair": (9, 72, 64, 6, 2, torch.tensor([[3, 1]] * 9)),
    "e5-odd-sizes": (17, 67, 33, 5, 2, None),
    "topk-equals-e": (11, 130, 200, 3, 3, None),
    "prefill": (150, 96, 136, 6, 2, None),
    # experts with 1, 2, 4, 4 and 5 rows: every row-block remainder of the AVX2 panels, odd K
    "rows-1-to-5": (8, 131, 75, 5, 2, torch.tensor([[4, 2], [4, 3], [4, 2], [4, 3], [4, 2],
                                                    [3, 1], [3, 1], [2, 0]])),
    # 100 rows on one expert: more than one 96-row chunk
    "over-a-chunk": (100, 66, 40, 3, 1, torch.zeros(100, 1, dtype=torch.long)),
    # AMX (bf16, 4 or more rows on an expert): every token on expert 0 (300 rows: 96-row chunks
    # and a 12-row rest), the others 3 (vdpbf16ps), 4, 17, 33 and 243 rows; odd H (5 tile steps
    # and a half pair), I = 75 (2 tile steps, 5 pairs and a half on the vector path)
    "amx-rows-3-to-300": (300, 161, 75, 6, 2, torch.stack(
        [torch.zeros(300, dtype=torch.long),
         torch.tensor([1] * 3 + [2] * 4 + [3] * 17 + [4] * 33 + [5] * 243)], 1)),
    # E = 7, top_k = 3, H and I off 16 / 32 / 64 (about 64 rows per expert)
    "amx-e7-odd-sizes": (150, 197, 83, 7, 3, None),
    # top_k = E, K below one 32-wide tile step on both GEMMs (all on the vector path)
    "amx-short-k": (40, 30, 20, 3, 3, None),
}
AMX_CASES = ["prefill", "topk-equals-e", "over-a-chunk", "amx-rows-3-to-300", "amx-e7-odd-sizes",
             "amx-short-k"]


def _run_case(name, dtype, activation="silu", prepared=True, stride=0):
    t, h, i, e, k, ids = MOE_CASES[name]
    hidden, w13, w2, tw, ti = make_moe(t, h, i, e, k, dtype, seed=t + h, ids=ids)
    if stride:
        hidden = torch.cat((hidden, torch.randn(t, stride).to(dtype)), 1)[:, :h]
    if prepared:
        out = ops.fused_moe_prepared(hidden, ops.prepare_moe_weights(w13, w2), tw, ti, activation)
    else:
        out = ops.fused_moe(hidden, w13, w2, tw, ti, activation)
    assert out.shape == hidden.shape and out.dtype == dtype
    exact = ops_native.fused_moe(hidden.double(), w13.double(), w2.double(), tw, ti, activation)
    native = same_precision_moe(hidden, w13, w2, tw, ti, activation)
    assert_close_to_ref(out, native, exact, what=f"fused_moe {name} {dtype} {activation}")
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_fused_moe_kernel(dtype, name):
    _run_case(name, dtype)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_kernel_activations(activation):
    _run_case("e5-odd-sizes", torch.bfloat16, activation)


NO_AMX_SCRIPT = r"""
import torch
import test_moe
for name in test_moe.AMX_CASES:
    test_moe._run_case(name, torch.bfloat16)
print("ok")
"""


def test_fused_moe_without_amx():
    # the vdpbf16ps panels bf16 prefill takes on avx512_bf16 CPUs without AMX (forced off here)
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", NO_AMX_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, OCTAVO_CPU_NO_AMX="1"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_fused_moe_kernel_unprepared_and_strided():
    # the raw-weight op packs on each call; hidden may be a row-strided view
    a = _run_case("e5-odd-sizes", torch.bfloat16, prepared=False)
    torch.testing.assert_close(a, _run_case("e5-odd-sizes", torch.bfloat16, stride=9), rtol=0, atol=0)


def test_fused_moe_kernel_amx_strided_rows():
    # the gathered rows of a row-strided hidden give the same tiles' sums
    a = _run_case("amx-e7-odd-sizes", torch.bfloat16)
    torch.testing.assert_close(a, _run_case("amx-e7-odd-sizes", torch.bfloat16, stride=5),
                               rtol=0, atol=0)


def test_fused_moe_kernel_zero_tokens():
    hidden, w13, w2, tw, ti = make_moe(0, 32, 16, 4, 2, torch.bfloat16)
    assert ops.fused_moe_prepared(hidden, ops.prepare_moe_weights(w13, w2), tw, ti).shape == (0, 32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_kernel_top_k_zero(dtype):
    # tokens routed to no expert at all: the MoE block adds nothing
    hidden, w13, w2, _, _ = make_moe(3, 40, 24, 4, 1, dtype)
    ids, weights = torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, 0)
    out = ops.fused_moe_prepared(hidden, ops.prepare_moe_weights(w13, w2), weights, ids)
    assert torch.equal(out, torch.zeros_like(hidden))


def test_pack_moe_weights_round_trip():
    _, w13, w2, _, _ = make_moe(1, 67, 33, 3, 1, torch.float32)
    w13p, w2p = ops_native.pack_moe_weights(w13, w2)
    assert w13p.shape == (3, 1, 2, 34, 64, 2) and w2p.shape == (3, 2, 17, 64, 2)
    back13, back2 = ops_native.unpack_moe_weights(w13p, w2p, 67, 33)
    assert torch.equal(back13, w13) and torch.equal(back2, w2)


@pytest.mark.parametrize("e,h,i", [(4, 256, 128), (3, 100, 64), (2, 64, 192), (2, 64, 100), (2, 33, 128),
                                   (8, 1024, 512)])
def test_prepare_moe_weights_equals_the_reference_packing(e, h, i):
    """ops.prepare_moe_weights copies whole panels straight into the packed tensors (on a
    huge-page mapping when they span one) and falls back to ops_native where panels need padding:
    the bytes are ops_native.pack_moe_weights' either way."""
    _, w13, w2, _, _ = make_moe(1, h, i, e, 1, torch.bfloat16)
    prepared = ops.prepare_moe_weights(w13, w2)
    ref13, ref2 = ops_native.pack_moe_weights(w13, w2)
    assert torch.equal(prepared.w13, ref13) and torch.equal(prepared.w2, ref2)
    assert (prepared.hidden_size, prepared.inter_size) == (h, i)
    assert prepared.w13.is_contiguous() and prepared.w2.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_opcheck(dtype):
    hidden, w13, w2, tw, ti = make_moe(5, 40, 24, 4, 2, dtype)
    out = torch.empty_like(hidden)
    torch.library.opcheck(torch.ops.octavo.fused_moe.default, (out, hidden, w13, w2, tw, ti, "silu"))
    w13p, w2p = ops_native.pack_moe_weights(w13, w2)
    torch.library.opcheck(torch.ops.octavo.fused_moe_packed.default,
                          (out, hidden, w13p, w2p, tw, ti, 24, "gelu"))
    logits = torch.randn(5, 8).to(dtype)
    w = torch.empty(5, 3)
    ids = torch.empty(5, 3, dtype=torch.int32)
    torch.library.opcheck(torch.ops.octavo.topk_routing.default,
                          (w, ids, logits, "sigmoid", True, torch.zeros(8), 2, 1, "top2_sum", 1.0))
    sorted_ids, expert_ids, post = (torch.empty(n, dtype=torch.int32)
                                    for n in (*ops_native.moe_align_sizes(10, 4, 4), 1))
    torch.library.opcheck(torch.ops.octavo.moe_align.default,
                          (sorted_ids, expert_ids, post, ti, 4, 4))


VARIANT_SCRIPT = r"""
import torch
import test_moe
for dtype in (torch.float32, torch.bfloat16):
    for name in ("one-token", "e5-odd-sizes", "prefill", "rows-1-to-5", "topk-equals-e"):
        test_moe._run_case(name, dtype)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2"),
                                 dict(OCTAVO_CPU_NO_AVX512BF16="1")],
                         ids=["default", "avx2", "avx512-without-bf16-dot"])
def test_fused_moe_variants(env):
    # each compiled variant (generic, AVX2 panels, AVX-512 without the bf16 dot) on the same cases
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    capability = res.stdout.split()[-1]
    if env.get("ATEN_CPU_CAPABILITY") == "default":
        assert capability == "DEFAULT"
    elif env.get("ATEN_CPU_CAPABILITY") == "avx2" and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert capability == "AVX2"  # the AVX2 panels ran, also on an AVX-512 machine


def test_fused_moe_lab_quick():
    # the kernel lab (bench/kernels/fused_moe.py) runs end to end and its checks pass
    import re
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.fused_moe", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and res.stdout.count("OK") == 4
    assert re.search(r"read bandwidth [\d.]+ GB/s, copy bandwidth [\d.]+ GB/s", res.stdout)
    assert len(re.findall(r"octavo.fused_moe +[\d.]+ ms +[\d.]+ GB/s", res.stdout)) == 4
