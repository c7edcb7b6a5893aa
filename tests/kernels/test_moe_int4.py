"""Fused MoE with 4-bit experts: the reference (ops_native.fused_moe_int4) vs a dense fp64 einsum
on the dequantized weights, the packed layout's round trip, then the CPU kernel (codes unpacked in
registers inside the fused MoE loops) vs the reference: fp32 / bf16 / fp16 activations, T from 1
to 300, idle experts, all tokens on one expert, E = 3 / 7, top-k = E, I and H off the 32-row panel
and the group, groups of 32 / 64 / 128 / per channel, with and without zero points, with offsets,
and GPTQ act order (random g_idx per expert on w13, w2 or both; the reference dequantizes with it);
on every CPU variant this machine runs (bf16 experts with 8 or more rows on AMX tiles where the
CPU has them, OCTAVO_CPU_NO_AMX=1 checked in a subprocess)."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import assert_close_to_ref
from test_moe import dense_moe, same_precision_moe
from octavo import ops, ops_native


def make_int4_moe(t, h, i, e, k, group_size, zeros=True, offsets=False, dtype=torch.float32,
                  seed=0, ids=None):
    """hidden [T, H], codes / scales / zeros (or offsets) of w13 [E, 2I, H] and w2 [E, H, I],
    routing weights and ids."""
    g = torch.Generator().manual_seed(seed)

    def stack(n, kk):
        _, groups = ops_native.int4_groups(kk, group_size)
        q = torch.randint(0, 16, (e, n, kk), generator=g, dtype=torch.uint8)
        s = (torch.rand(e, n, groups, generator=g) + 0.5) / (4 * kk ** 0.5)
        z = torch.randint(0, 16, (e, n, groups), generator=g).float() if zeros else None
        o = torch.randn(e, n, groups, generator=g) * s * 4 if offsets else None
        return q, s, z, o
    w13 = stack(2 * i, h)
    w2 = stack(h, i)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(t, k, generator=g) + 0.1
    return hidden, w13, w2, weights.float(), ids.to(torch.int32)


def dequantized(stack, group_size, g_idx=None):
    q, s, z, o = stack
    return ops_native.moe_int4_dequantize(q, s, z, group_size, o, g_idx)


def act_order_g_idx(e, k, group_size, seed=0):
    """GPTQ act order per expert, int32 [E, K]: columns quantized in a random order, group =
    position in that order // group_size (so each group but the last holds group_size)."""
    gen = torch.Generator().manual_seed(seed)
    gs, _ = ops_native.int4_groups(k, group_size)
    return torch.stack([torch.argsort(torch.randperm(k, generator=gen)) // gs
                        for _ in range(e)]).to(torch.int32)


# (T, H, I, E, k, ids)
CASES = {
    "one-token": (1, 64, 64, 4, 2, None),
    "two-tokens-odd-sizes": (2, 96, 80, 5, 2, None),
    "idle-experts": (3, 96, 80, 8, 1, torch.tensor([[5], [2], [5]])),
    "all-on-one": (7, 128, 96, 4, 1, torch.zeros(7, 1, dtype=torch.long)),
    "e3-topk-equals-e": (7, 130, 200, 3, 3, None),
    "prefill": (64, 256, 136, 6, 2, None),
    # AMX (bf16, 8 or more rows on an expert, groups of whole 32-wide K steps): every token on
    # expert 0 (300 rows: 32-row blocks and a 12-row rest), the others 7 (vdpbf16ps), 8, 17, 33
    # and 235 rows; odd H = 161 (a 1-column last group), I = 75
    "amx-rows-7-to-300": (300, 161, 75, 6, 2, torch.stack(
        [torch.zeros(300, dtype=torch.long),
         torch.tensor([1] * 7 + [2] * 8 + [3] * 17 + [4] * 33 + [5] * 235)], 1)),
    # E = 7, top_k = 3, H and I off 16 / 32 (about 64 rows per expert)
    "amx-e7-odd-sizes": (150, 197, 83, 7, 3, None),
    # top_k = E, 40 rows on each expert
    "amx-topk-equals-e": (40, 96, 80, 3, 3, None),
}
AMX_CASES = ["prefill", "amx-rows-7-to-300", "amx-e7-odd-sizes", "amx-topk-equals-e"]
GROUPS = (32, 64, 128, -1)


def test_reference_vs_dense_on_dequantized_weights():
    for gs, zeros, offsets in ((32, True, False), (-1, False, False), (64, False, True)):
        hidden, w13, w2, tw, ti = make_int4_moe(7, 130, 200, 5, 2, gs, zeros, offsets,
                                                dtype=torch.float64)
        out = ops_native.fused_moe_int4(hidden, *w13[:3], *w2[:3], tw, ti, gs, "silu",
                                        w13[3], w2[3])
        dense = dense_moe(hidden, dequantized(w13, gs), dequantized(w2, gs), tw, ti)
        torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_dequantize_hand_computed():
    q = torch.tensor([[[0, 15, 8, 3]]], dtype=torch.uint8)           # [E=1, N=1, K=4], groups of 2
    s = torch.tensor([[[0.5, 2.0]]])
    z = torch.tensor([[[1.0, 4.0]]])
    expect = torch.tensor([[[(0 - 1) * 0.5, (15 - 1) * 0.5, (8 - 4) * 2.0, (3 - 4) * 2.0]]])
    torch.testing.assert_close(ops_native.moe_int4_dequantize(q, s, z, 2), expect)
    # offsets replace -zeros * scales; None zeros: symmetric 8
    torch.testing.assert_close(ops_native.moe_int4_dequantize(q, s, None, 2, -z * s), expect)
    torch.testing.assert_close(ops_native.moe_int4_dequantize(q, s, None, 2),
                               (q.float() - 8) * s.repeat_interleave(2, -1))


def test_packing_round_trip():
    # gate and up rows are padded to whole 32-row panels each (I = 45: 2 panels apiece)
    _, w13, w2, _, _ = make_int4_moe(1, 70, 45, 3, 1, 32, zeros=True)
    p = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32)
    assert p.w13.shape == (3, 4, 35, 32) and p.w13_scales_offsets.shape == (3, 4, 3, 2, 32)
    assert p.w2.shape == (3, 3, 23, 32) and p.w2_scales_offsets.shape == (3, 3, 2, 2, 32)
    assert (p.hidden_size, p.inter_size, p.group_size) == (70, 45, 32)
    a, b = ops_native.unpack_moe_int4_weights(p)
    torch.testing.assert_close(a, dequantized(w13, 32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, dequantized(w2, 32), rtol=1e-6, atol=1e-6)
    # panel 2 of expert 1 starts the up rows: byte 2j+i of K pair kk is (row j, k = 2kk+i)
    q = w13[0]
    assert p.w13[1, 2, 3, 2 * 5 + 1] == q[1, 45 + 5, 7] | (q[1, 45 + 21, 7] << 4)


def test_act_order_reference_vs_dense_on_dequantized_weights():
    # the reference dequantizes each expert with its own g_idx: W[n, k] uses group g_idx[e, k]
    hidden, w13, w2, tw, ti = make_int4_moe(7, 130, 200, 5, 2, 32, dtype=torch.float64)
    g13, g2 = act_order_g_idx(5, 130, 32, 1), act_order_g_idx(5, 200, 32, 2)
    out = ops_native.fused_moe_int4(hidden, *w13[:3], *w2[:3], tw, ti, 32, w13_g_idx=g13,
                                    w2_g_idx=g2)
    dense = dense_moe(hidden, dequantized(w13, 32, g13), dequantized(w2, 32, g2), tw, ti)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
    q, s, z, _ = w13
    col = 77                                        # one weight by hand: expert 3, row 5
    g = int(g13[3, col])
    assert dequantized(w13, 32, g13)[3, 5, col] == (q[3, 5, col].float() - z[3, 5, g]) * s[3, 5, g]
    assert not torch.equal(dequantized(w13, 32, g13), dequantized(w13, 32))


def test_act_order_packing_round_trip():
    # sorted by group for the kernel (w13 columns per expert, the intermediate by w2's order);
    # unpacking gives the experts back in the caller's order
    _, w13, w2, _, _ = make_int4_moe(1, 70, 45, 3, 1, 16, offsets=True)
    g13, g2 = act_order_g_idx(3, 70, 16, 3), act_order_g_idx(3, 45, 16, 4)
    g2[1] = torch.arange(45) // 16                  # one expert in plain order
    p = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 16, w13[3], w2[3], g13, g2)
    assert p.w13_perm.dtype == torch.int32 and p.w13_perm.shape == (3, 70)
    assert torch.equal(p.w13_perm[0].long(), torch.sort(g13[0].long(), stable=True).indices)
    assert torch.equal(p.inter_perm[1], torch.arange(45))
    a, b = ops_native.unpack_moe_int4_weights(p)
    torch.testing.assert_close(a, dequantized(w13, 16, g13), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, dequantized(w2, 16, g2), rtol=1e-6, atol=1e-6)
    # a shared [K] g_idx, and plain ones, which need no permutation
    plain = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 16, w13_g_idx=torch.arange(70) // 16,
                                         w2_g_idx=torch.arange(45) // 16)
    assert plain.w13_perm is None and plain.inter_perm is None
    shared = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 16, w13_g_idx=g13[2])
    assert torch.equal(shared.w13_perm, shared.w13_perm[2].expand(3, 70))


@pytest.mark.skipif(ops.USING_NATIVE, reason="octavo._C is not built: ops packs with the reference")
def test_prepare_packs_like_the_reference():
    # ops.prepare_moe_int4_weights packs each expert with the C++ pack_int4_panels: the same
    # bytes as ops_native's, act order and offsets included
    _, w13, w2, _, _ = make_int4_moe(1, 70, 45, 3, 1, 16, offsets=True)
    g13, g2 = act_order_g_idx(3, 70, 16, 3), act_order_g_idx(3, 45, 16, 4)
    args = (*w13[:3], *w2[:3], 16, w13[3], w2[3], g13, g2)
    ours, ref = ops.prepare_moe_int4_weights(*args), ops_native.prepare_moe_int4_weights(*args)
    for a, b in zip(ours, ref):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)


def test_act_order_bad_g_idx_raises():
    _, w13, w2, _, _ = make_int4_moe(1, 64, 64, 2, 1, 32)
    lopsided = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)    # groups of 40 and 24
    with pytest.raises(ValueError, match="w13 g_idx groups must each hold group_size"):
        ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32, w13_g_idx=lopsided)
    with pytest.raises(ValueError, match=r"w2 g_idx must hold group indices in \[0, 2\)"):
        ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32, w2_g_idx=torch.full((64,), 2))
    with pytest.raises(ValueError, match=r"w2 g_idx must be \[K\] or \[E, K\]"):
        ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32, w2_g_idx=torch.zeros(3, 64))


def _run(name, dtype, gs, zeros=True, offsets=False, activation="silu", stride=0,
         act_order=""):
    # act_order: "w13", "w2" or "both" stacks get a random GPTQ act order per expert
    t, h, i, e, k, ids = CASES[name]
    hidden, w13, w2, tw, ti = make_int4_moe(t, h, i, e, k, gs, zeros, offsets, dtype,
                                            seed=t + h + gs, ids=ids)
    if stride:
        hidden = torch.cat((hidden, torch.randn(t, stride).to(dtype)), 1)[:, :h]
    g13 = act_order_g_idx(e, h, gs, t) if act_order in ("w13", "both") else None
    g2 = act_order_g_idx(e, i, gs, t + 1) if act_order in ("w2", "both") else None
    prepared = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], gs, w13[3], w2[3], g13, g2)
    out = ops.fused_moe_int4_prepared(hidden, prepared, tw, ti, activation)
    assert out.shape == hidden.shape and out.dtype == dtype
    exact = ops_native.fused_moe_int4(hidden.double(), *w13[:3], *w2[:3], tw, ti, gs, activation,
                                      w13[3], w2[3], g13, g2)
    native = same_precision_moe(hidden, dequantized(w13, gs, g13).to(dtype),
                                dequantized(w2, gs, g2).to(dtype), tw, ti, activation)
    assert_close_to_ref(out, native, exact, what=f"fused_moe_int4 {name} {dtype} gs={gs} "
                        f"zeros={zeros} offsets={offsets} act_order={act_order!r}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_moe_int4_kernel(name, gs, dtype):
    _run(name, dtype, gs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros,offsets", [(False, False), (False, True)])
def test_fused_moe_int4_symmetric_and_offsets(dtype, zeros, offsets):
    _run("e3-topk-equals-e", dtype, 64, zeros, offsets)
    _run("one-token", dtype, -1, zeros, offsets)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_int4_activations_fp16(activation):
    _run("two-tokens-odd-sizes", torch.float16, 32, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_moe_int4_act_order(name, gs, dtype):
    # T = 1, 2, 3, 7, 7, 64; H and I off the panel and the group (last groups short)
    _run(name, dtype, gs, act_order="both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stacks", ["w13", "w2"])
def test_fused_moe_int4_act_order_one_stack(stacks, dtype):
    _run("e3-topk-equals-e", dtype, 32, act_order=stacks)
    _run("two-tokens-odd-sizes", dtype, 16, zeros=False, offsets=True, act_order=stacks)


NO_AMX_SCRIPT = r"""
import torch
import test_moe_int4 as m
for name in m.AMX_CASES:
    for gs in (32, -1):
        m._run(name, torch.bfloat16, gs)
    m._run(name, torch.bfloat16, 64, act_order="both")
print("ok")
"""


def test_fused_moe_int4_without_amx():
    # the vdpbf16ps panels bf16 prefill takes on avx512_bf16 CPUs without AMX (forced off here)
    res = subprocess.run([sys.executable, "-c", NO_AMX_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, OCTAVO_CPU_NO_AMX="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_fused_moe_int4_amx_groups_of_16():
    # groups that are not whole 32-wide steps keep the vdpbf16ps panels, also with many rows
    _run("amx-topk-equals-e", torch.bfloat16, 16)
    _run("amx-e7-odd-sizes", torch.bfloat16, 16, zeros=False, offsets=True, act_order="w13")


def test_fused_moe_int4_strided_rows_equal_contiguous():
    a = _run("prefill", torch.bfloat16, 128)
    torch.testing.assert_close(a, _run("prefill", torch.bfloat16, 128, stride=7), rtol=0, atol=0)


def test_fused_moe_int4_zero_tokens_and_bad_ids():
    hidden, w13, w2, tw, ti = make_int4_moe(0, 64, 32, 4, 2, 32)
    p = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32)
    assert ops.fused_moe_int4_prepared(hidden, p, tw, ti).shape == (0, 64)
    hidden, w13, w2, tw, ti = make_int4_moe(3, 64, 32, 4, 2, 32)
    p = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32)
    with pytest.raises(ValueError, match="expert ids"):
        ops.fused_moe_int4_prepared(hidden, p, tw, ti + 10)


def test_fused_moe_int4_op_errors_and_opcheck():
    hidden, w13, w2, tw, ti = make_int4_moe(5, 64, 48, 4, 2, 32, dtype=torch.bfloat16)
    p = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32)
    out = torch.empty_like(hidden)
    args = [out, hidden, p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets, tw, ti, 48, 32, "silu"]
    torch.library.opcheck(torch.ops.octavo.fused_moe_int4_packed.default, tuple(args))
    op = torch.ops.octavo.fused_moe_int4_packed
    with pytest.raises(RuntimeError, match="w13_packed"):
        op(*args[:8], 70, 32, "silu")                       # inter size that is not the packed one
    with pytest.raises(RuntimeError, match="group_size"):
        op(*args[:9], 31, "silu")
    with pytest.raises(RuntimeError, match="w2_scales_offsets"):
        op(*args[:5], p.w2_scales_offsets[:, :, :1].contiguous(), *args[6:])
    with pytest.raises(RuntimeError, match="activation"):
        op(*args[:10], "relu")
    # act order: the per-expert K order of w13 (int32 [E, H])
    pa = ops.prepare_moe_int4_weights(*w13[:3], *w2[:3], 32, w13_g_idx=act_order_g_idx(4, 64, 32))
    torch.library.opcheck(torch.ops.octavo.fused_moe_int4_packed.default,
                          (out, hidden, pa.w13, pa.w2, pa.w13_scales_offsets, pa.w2_scales_offsets,
                           tw, ti, 48, 32, "silu", pa.w13_perm))
    with pytest.raises(RuntimeError, match="w13_perm must be a contiguous int32"):
        op(*args, pa.w13_perm.long())
    with pytest.raises(RuntimeError, match="w13_perm must be a contiguous int32"):
        op(*args, pa.w13_perm[:3].contiguous())
    with pytest.raises(RuntimeError, match="w13_perm holds a column outside"):
        op(*args, pa.w13_perm + 1)


VARIANT_SCRIPT = r"""
import torch
import test_moe_int4 as m
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for name, gs in (("one-token", 32), ("two-tokens-odd-sizes", -1), ("e3-topk-equals-e", 64),
                     ("prefill", 128)):
        m._run(name, dtype, gs)
    m._run("all-on-one", dtype, 32, zeros=False, offsets=True)
    m._run("prefill", dtype, 64, act_order="both")
    m._run("one-token", dtype, 32, zeros=False, act_order="w13")
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2"),
                                 dict(OCTAVO_CPU_NO_AVX512BF16="1")],
                         ids=["default", "avx2", "avx512-without-bf16-dot"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_fused_moe_int4_lab_quick():
    # the kernel lab (bench/kernels/fused_moe_int4.py, driven by fused_moe_fp8's) runs end to end
    import re
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.fused_moe_int4", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and res.stdout.count("OK") == 4
    assert len(re.findall(r"octavo.fused_moe_int4 +[\d.]+ ms +[\d.]+ GB/s", res.stdout)) == 4
