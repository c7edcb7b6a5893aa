"""The csrc/cuda MoE kernels (routing, align, fused_moe on mma.sync tiles) under the SIMT
emulator (torch.ops.octavo_simt.*) against octavo.ops_native, tolerances as tests/kernels."""
import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native
from test_moe import MOE_CASES, ROUTING_CASES, check_align, make_moe, same_precision_moe


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(ROUTING_CASES)))
def test_topk_routing(simt, dtype, case):
    kw = dict(ROUTING_CASES[case])
    g = torch.Generator().manual_seed(case)
    bias = torch.randn(12, generator=g) * 0.2 if kw.pop("bias", False) else None
    logits = (torch.randn(19, 12, generator=g) * 2).to(dtype)
    top_k = kw.pop("top_k")
    ref_w, ref_ids = ops_native.topk_routing(logits, top_k, bias=bias, **kw)
    w = torch.empty(19, top_k)
    ids = torch.empty(19, top_k, dtype=torch.int32)
    simt.topk_routing(w, ids, logits, kw.get("scoring", "softmax"), kw.get("renormalize", True), bias,
                      kw.get("n_group", 1), kw.get("topk_group", 1), kw.get("group_score", "max"),
                      kw.get("routed_scaling_factor", 1.0))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,k,e,block", [(1, 1, 4, 16), (13, 2, 5, 4), (70, 8, 8, 16), (0, 2, 4, 8),
                                         (40, 1, 6, 64)])
def test_moe_align(simt, t, k, e, block):
    g = torch.Generator().manual_seed(t + k)
    ids = (torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t
           else torch.zeros(0, k, dtype=torch.long)).int()
    p, nblocks = ops_native.moe_align_sizes(ids.numel(), e, block)
    out = (torch.full((p,), -5, dtype=torch.int32), torch.full((nblocks,), -5, dtype=torch.int32),
           torch.full((1,), -5, dtype=torch.int32))
    simt.moe_align(*out, ids, e, block)
    check_align(ids, e, block, *out)
    for a, b in zip(out, ops_native.moe_align(ids, e, block)):
        assert torch.equal(a, b)


# the emulator runs every thread on the CPU: the smaller of the shared cases
SIMT_CASES = ["one-token", "idle-experts", "all-on-one-pair", "e5-odd-sizes", "topk-equals-e"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SIMT_CASES)
def test_fused_moe(simt, dtype, name):
    t, h, i, e, k, ids = MOE_CASES[name]
    hidden, w13, w2, tw, ti = make_moe(t, h, i, e, k, dtype, seed=t + h, ids=ids)
    out = torch.full_like(hidden, float("nan"))
    simt.fused_moe(out, hidden, w13, w2, tw, ti, "silu")
    exact = ops_native.fused_moe(hidden.double(), w13.double(), w2.double(), tw, ti)
    assert_close_to_ref(out, same_precision_moe(hidden, w13, w2, tw, ti), exact, what=f"simt {name}")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_activations_and_strided_rows(simt, activation):
    t, h, i, e, k, ids = MOE_CASES["e5-odd-sizes"]
    hidden, w13, w2, tw, ti = make_moe(t, h, i, e, k, torch.bfloat16, seed=5, ids=ids)
    wide = torch.cat((hidden, torch.zeros(t, 5, dtype=hidden.dtype)), 1)[:, :h]
    out = torch.empty_like(hidden)
    simt.fused_moe(out, wide, w13, w2, tw, ti, activation)
    exact = ops_native.fused_moe(hidden.double(), w13.double(), w2.double(), tw, ti, activation)
    assert_close_to_ref(out, same_precision_moe(hidden, w13, w2, tw, ti, activation), exact,
                        what=f"simt {activation}")


def test_bad_inputs_are_rejected(simt):
    hidden, w13, w2, tw, ti = make_moe(2, 16, 8, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        simt.fused_moe(torch.empty_like(hidden), hidden, w13, w2, tw, ti, "silu")
    hb, w13b, w2b = hidden.bfloat16(), w13.bfloat16(), w2.bfloat16()
    with pytest.raises(RuntimeError, match="activation"):
        simt.fused_moe(torch.empty_like(hb), hb, w13b, w2b, tw, ti, "relu")
    with pytest.raises(RuntimeError, match="w13"):
        simt.fused_moe(torch.empty_like(hb), hb, w13b, w2b[:, :, :4].contiguous(), tw, ti, "silu")


# ---- e4m3 experts (dequantized into bf16 / fp16 tiles as they are staged) ----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["block", "channel", "tensor"])
@pytest.mark.parametrize("name", ["one-token", "e5-odd-sizes", "blocks"])
def test_fused_moe_fp8(simt, dtype, kind, name):
    from test_moe_fp8 import BLOCK, CASES, dequantize_experts, make_fp8_moe
    t, h, i, e, k, ids = CASES[name]
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(t, h, i, e, k, dtype, kind, seed=t + h, ids=ids)
    block = BLOCK if kind == "block" else None
    r13, bk13 = ops_native.fp8_moe_row_scales(s13, 2 * i, h, block)
    r2, bk2 = ops_native.fp8_moe_row_scales(s2, h, i, block)
    out = torch.full_like(hidden, float("nan"))
    simt.fused_moe_fp8(out, hidden, q13, q2, r13, r2, tw, ti, bk13, bk2, "silu")
    exact = ops_native.fused_moe_fp8(hidden.double(), q13, q2, s13, s2, tw, ti, "silu", block)
    w13, w2 = dequantize_experts(q13, s13, kind), dequantize_experts(q2, s2, kind)
    assert_close_to_ref(out, same_precision_moe(hidden, w13.to(dtype), w2.to(dtype), tw, ti), exact,
                        what=f"simt fp8 {name} {kind}")


def test_fused_moe_fp8_rejects_float_weights(simt):
    hidden, w13, w2, tw, ti = make_moe(2, 16, 8, 4, 2, torch.bfloat16)
    s13, s2 = torch.ones(4, 16, 1), torch.ones(4, 16, 1)
    with pytest.raises(RuntimeError, match="e4m3 codes"):
        simt.fused_moe_fp8(torch.empty_like(hidden), hidden, w13, w2, s13, s2, tw, ti, 16, 8, "silu")
