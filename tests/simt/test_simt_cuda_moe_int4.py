"""The csrc/cuda fused MoE over 4-bit experts under the SIMT emulator
(torch.ops.octavo_simt.fused_moe_int4_packed) on the operands ops_native.prepare_moe_int4_weights
makes for the CPU kernel, against the experts dequantized in fp64 (octavo.ops_native.fused_moe)
with plain PyTorch in the kernel's dtype as the error yardstick: bf16 and fp16, the decode (few
pairs) and four-panel shapes, one token, idle experts, all pairs on one expert, E = 3 / 5 / 6,
top_k = E, H and I off the 32-wide panel and the 64-wide K tile (odd H), group sizes 32 / 128 /
per channel, symmetric and with zero points, offsets, the three activations, strided hidden, and
GPTQ act order (a random g_idx per expert on w13 and w2: hidden gathered per expert as the tiles
load, the intermediate in w2's group order)."""
import pytest
import torch

import simt_moe_int4_ext
from kernel_utils import assert_close_to_ref
from octavo import ops, ops_native
from test_moe import same_precision_moe


@pytest.fixture(scope="module")
def simt():
    return simt_moe_int4_ext.load()


def make_case(t, h, i, e, k, group_size, zeros, ids=None, offsets=False, seed=0, act_order=False):
    """Random 4-bit experts (codes, scales, zeros or offsets, g_idx or None) and routing; the
    fp64 experts. act_order: GPTQ's, group = position in a random column order // group_size."""
    g = torch.Generator().manual_seed(seed + 13 * t + 7 * h + i)

    def stack(n, kk):
        gs, groups = ops_native.int4_groups(kk, group_size)
        q = torch.randint(0, 16, (e, n, kk), generator=g, dtype=torch.uint8)
        s = (torch.rand(e, n, groups, generator=g) + 0.5) / (4 * kk ** 0.5)
        z = torch.randint(0, 16, (e, n, groups), generator=g).float() if zeros else None
        off = -torch.rand(e, n, groups, generator=g) * s * 12 if offsets else None
        g_idx = torch.stack([torch.argsort(torch.randperm(kk, generator=g)) // gs
                             for _ in range(e)]) if act_order else None
        idx = (torch.arange(kk) // gs).expand(e, n, kk) if g_idx is None else \
            g_idx[:, None, :].expand(e, n, kk)

        def per_weight(x):          # [E, N, G] -> [E, N, K] by each column's group
            return x.double().gather(2, idx)
        sd = per_weight(s)
        if off is not None:
            w = q.double() * sd + per_weight(off)
        else:
            w = (q.double() - (8.0 if z is None else per_weight(z))) * sd
        return q, s, z, off, w, g_idx
    w13 = stack(2 * i, h)
    w2 = stack(h, i)
    hidden = torch.randn(t, h, generator=g)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g) + 0.1
    return hidden, w13, w2, weights.float(), ids.to(torch.int32)


def run(simt, hidden, w13, w2, tw, ti, group_size, activation="silu"):
    q13, s13, z13, o13, _, g13 = w13
    q2, s2, z2, o2, _, g2 = w2
    p = ops_native.prepare_moe_int4_weights(q13, s13, z13, q2, s2, z2, group_size, w13_offsets=o13,
                                            w2_offsets=o2, w13_g_idx=g13, w2_g_idx=g2)
    assert (p.w13_perm is not None) == (g13 is not None and group_size != -1)
    out = torch.full(hidden.shape, float("nan"), dtype=hidden.dtype)
    simt.fused_moe_int4_packed(out, hidden, p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets,
                               tw, ti, p.inter_size, p.group_size, activation, p.w13_perm)
    return out


def check(out, hidden, w13, w2, tw, ti, activation="silu", what=""):
    exact = ops_native.fused_moe(hidden.double(), w13[4], w2[4], tw, ti, activation)
    native = same_precision_moe(hidden, w13[4].to(hidden.dtype), w2[4].to(hidden.dtype), tw, ti,
                                activation)
    assert not out.isnan().any(), what
    assert_close_to_ref(out, native, exact, what=what)


# (T, H, I, E, top_k, ids, group_size): decode shape up to 64 (token, expert) pairs, else four
# panels per block
CASES = {
    "one-token": (1, 64, 64, 4, 2, None, 32),
    "idle-experts": (3, 96, 80, 8, 1, torch.tensor([[5], [2], [5]]), 32),
    "all-on-one-pair": (9, 64, 48, 6, 2, torch.tensor([[3, 1]] * 9), -1),
    "e5-odd-sizes": (7, 67, 33, 5, 2, None, -1),
    "topk-equals-e": (5, 256, 136, 3, 3, None, 128),
    "four-panels": (40, 96, 72, 6, 2, None, 32),
    "four-panels-two-blocks": (33, 160, 144, 4, 2, None, 32),
    "four-panels-all-on-one": (70, 64, 40, 3, 1, torch.zeros(70, 1, dtype=torch.long), 128),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_moe_int4(simt, dtype, zeros, name):
    t, h, i, e, k, ids, gs = CASES[name]
    hidden, w13, w2, tw, ti = make_case(t, h, i, e, k, gs, zeros, ids)
    hidden = hidden.to(dtype)
    out = run(simt, hidden, w13, w2, tw, ti, gs)
    check(out, hidden, w13, w2, tw, ti, what=f"simt int4 moe {name} {dtype} zeros={zeros}")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activations_and_offsets(simt, activation):
    hidden, w13, w2, tw, ti = make_case(6, 64, 48, 4, 2, 32, False, offsets=True)
    hidden = hidden.half()
    out = run(simt, hidden, w13, w2, tw, ti, 32, activation)
    check(out, hidden, w13, w2, tw, ti, activation, what=f"simt int4 moe offsets {activation}")


# (T, H, I, E, top_k, group_size): T = 1, 2, 7 in the decode shape, 64 in the four-panel one
ACT_ORDER_CASES = {
    "one-token": (1, 64, 64, 4, 2, 32),
    "two-tokens": (2, 96, 80, 5, 2, 32),
    "odd-h-short-last-groups": (7, 67, 48, 5, 2, 16),
    "four-panels": (64, 96, 72, 6, 2, 32),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ACT_ORDER_CASES))
def test_act_order(simt, dtype, name):
    t, h, i, e, k, gs = ACT_ORDER_CASES[name]
    hidden, w13, w2, tw, ti = make_case(t, h, i, e, k, gs, dtype == torch.float16, act_order=True)
    hidden = hidden.to(dtype)
    out = run(simt, hidden, w13, w2, tw, ti, gs)
    check(out, hidden, w13, w2, tw, ti, what=f"simt int4 moe act order {name} {dtype}")
    # and so does the reference that dequantizes with g_idx (what the CPU op is tested against)
    ref = ops_native.fused_moe_int4(hidden, *w13[:3], *w2[:3], tw, ti, gs, w13_g_idx=w13[5],
                                    w2_g_idx=w2[5])
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.02)


def test_strided_hidden(simt):
    # a row stride that is not 16-byte aligned takes the element-wise loads instead of cp.async
    hidden, w13, w2, tw, ti = make_case(5, 64, 40, 4, 2, 32, True)
    wide = torch.cat((torch.zeros(5, 1), hidden, torch.zeros(5, 4)), 1).bfloat16()[:, 1:65]
    out = run(simt, wide, w13, w2, tw, ti, 32)
    check(out, wide.contiguous(), w13, w2, tw, ti, what="simt int4 moe strided hidden")


def test_matches_the_reference(simt):
    # the kernel and ops_native.fused_moe_int4 (the CPU op's reference) read the same codes
    hidden, w13, w2, tw, ti = make_case(4, 64, 40, 4, 2, 32, True)
    hidden = hidden.bfloat16()
    out = run(simt, hidden, w13, w2, tw, ti, 32)
    ref = ops_native.fused_moe_int4(hidden, *w13[:3], *w2[:3], tw, ti, 32)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.02)


def test_no_tokens(simt):
    hidden, w13, w2, tw, ti = make_case(0, 64, 32, 4, 2, 32, False, ids=torch.zeros(0, 2, dtype=torch.long))
    out = run(simt, hidden.bfloat16(), w13, w2, tw, ti, 32)
    assert out.shape == (0, 64)


@pytest.mark.parametrize("dtype,h,i,gs", [(torch.float32, 64, 32, 32), (torch.bfloat16, 64, 32, 8),
                                         (torch.float16, 64, 40, 24), (torch.bfloat16, 67, 33, -1),
                                         (torch.float16, 64, 48, 16)])
def test_cuda_dispatch_rule_matches_the_kernel(simt, dtype, h, i, gs):
    # ops.fused_moe_int4_prepared sends exactly the CUDA calls that the kernel refuses to the
    # reference (ops.int4_cuda_supported on both GEMMs' K)
    hidden, w13, w2, tw, ti = make_case(2, h, i, 4, 2, gs, False)
    supported = ops.int4_cuda_supported(dtype, h, gs) and ops.int4_cuda_supported(dtype, i, gs)
    try:
        out = run(simt, hidden.to(dtype), w13, w2, tw, ti, gs)
    except RuntimeError:
        assert not supported
    else:
        assert supported and not out.isnan().any()


def test_bad_inputs_are_rejected(simt):
    hidden, w13, w2, tw, ti = make_case(2, 64, 32, 4, 2, 32, False)
    p = ops_native.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32)
    args = (p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets, tw, ti)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        simt.fused_moe_int4_packed(torch.empty_like(hidden), hidden, *args, 32, 32, "silu")
    hb = hidden.bfloat16()
    with pytest.raises(RuntimeError, match="w13 must be a contiguous uint8"):
        simt.fused_moe_int4_packed(torch.empty_like(hb), hb, *args, 64, 32, "silu")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        simt.fused_moe_int4_packed(torch.empty_like(hb), hb, *args, 32, 8, "silu")
    with pytest.raises(RuntimeError, match="activation"):
        simt.fused_moe_int4_packed(torch.empty_like(hb), hb, *args, 32, 32, "relu")
    with pytest.raises(RuntimeError, match="w13_perm must be a contiguous int32"):
        simt.fused_moe_int4_packed(torch.empty_like(hb), hb, *args, 32, 32, "silu",
                                   torch.zeros(4, 64, dtype=torch.int64))
