"""Fused MoE with weight-only int8 experts (W = q * scale + offset per group; GGUF Q8_0 / Q5_K /
Q6_K experts): the reference (ops_native.fused_moe_int8) vs a dense fp64 einsum on the dequantized
weights, the packed layout's round trip, then the CPU kernel vs the reference: fp32 / bf16 / fp16
activations, T from 1 to 64 (and past the 1024-token chunk), idle experts, all tokens on one
expert, E = 3, top-k = E, I and H off the 16-row panel and the group, groups of 16 / 32 / 128 /
per channel, different group sizes for w13 and w2, with and without offsets; on every CPU variant
this machine runs."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import assert_close_to_ref
from test_moe import dense_moe, same_precision_moe
from octavo import ops, ops_native


def make_int8_moe(t, h, i, e, k, gs13, gs2=None, offsets=True, dtype=torch.float32, seed=0,
                  ids=None):
    """hidden [T, H], (codes, scales, offsets) of w13 [E, 2I, H] and w2 [E, H, I], routing."""
    g = torch.Generator().manual_seed(seed)
    gs2 = gs13 if gs2 is None else gs2

    def stack(n, kk, gs):
        _, groups = ops_native.int4_groups(kk, gs)
        q = torch.randint(-128, 128, (e, n, kk), generator=g).to(torch.int8)
        s = (torch.rand(e, n, groups, generator=g) + 0.5) / (64 * kk ** 0.5)
        o = torch.randn(e, n, groups, generator=g) * s * 16 if offsets else None
        return q, s, o
    w13, w2 = stack(2 * i, h, gs13), stack(h, i, gs2)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(t, k, generator=g) + 0.1
    return hidden, w13, w2, weights.float(), ids.to(torch.int32)


def hand_dequantize(q, s, o, gs):
    # one weight at a time, from the definition W[n, k] = q[n, k] * s[n, k // gs] + o[n, k // gs]
    e, n, k = q.shape
    gs = k if gs == -1 else gs
    w = torch.empty(e, n, k, dtype=torch.float64)
    for kk in range(k):
        w[:, :, kk] = q[:, :, kk].double() * s[:, :, kk // gs].double() + (
            0.0 if o is None else o[:, :, kk // gs].double())
    return w


# (T, H, I, E, k, ids)
CASES = {
    "one-token": (1, 64, 64, 4, 2, None),
    "two-tokens-odd-sizes": (2, 96, 80, 5, 2, None),
    "idle-experts": (3, 96, 80, 8, 1, torch.tensor([[5], [2], [5]])),
    "all-on-one": (7, 128, 96, 4, 1, torch.zeros(7, 1, dtype=torch.long)),
    "e3-topk-equals-e": (7, 130, 200, 3, 3, None),
    "prefill": (64, 256, 136, 6, 2, None),
}
GROUPS = ((16, 16), (32, 32), (32, 16), (128, 64), (-1, -1))


def test_reference_vs_dense_on_dequantized_weights():
    hidden, w13, w2, tw, ti = make_int8_moe(5, 64, 48, 4, 2, 32, 16)
    want = dense_moe(hidden, hand_dequantize(*w13, 32), hand_dequantize(*w2, 16), tw, ti)
    got = ops_native.fused_moe_int8(hidden.double(), *w13, *w2, tw, ti, 32, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)   # weights dequantized in fp32


def test_packing_round_trip():
    # I = 40 and H = 50: both off the 16-row panel; group 16 over H = 50 leaves a short last group
    _, w13, w2, _, _ = make_int8_moe(1, 50, 40, 3, 1, 16, 32)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 16, 32)
    assert p.w13.shape == (3, 2 * 3, 50, 16) and p.w2.shape == (3, 4, 40, 16)
    assert p.w13_scales_offsets.shape == (3, 6, 4, 2, 16) and p.w2_scales_offsets.shape == (3, 4, 2, 2, 16)
    a, b = ops_native.unpack_moe_int8_weights(p)
    torch.testing.assert_close(a.double(), hand_dequantize(*w13, 16), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.double(), hand_dequantize(*w2, 32), rtol=1e-6, atol=1e-7)


def test_bad_shapes_raise():
    _, w13, w2, _, _ = make_int8_moe(1, 64, 32, 3, 1, 32)
    with pytest.raises(ValueError, match="w13 scales must be"):
        ops.prepare_moe_int8_weights(*w13, *w2, 16)             # 32-groups given as 16-groups
    with pytest.raises(ValueError, match="codes must be int8"):
        ops.prepare_moe_int8_weights(w13[0].to(torch.uint8), *w13[1:], *w2, 32)
    with pytest.raises(ValueError, match="w13 must be"):
        ops.prepare_moe_int8_weights(*w13, w2[0][:, :, :16], w2[1][:, :, :1], w2[2][:, :, :1], 32)


def _run(name, dtype, gs13, gs2, offsets=True, activation="silu", stride=0):
    t, h, i, e, k, ids = CASES[name]
    hidden, w13, w2, tw, ti = make_int8_moe(t, h, i, e, k, gs13, gs2, offsets, dtype,
                                            seed=t + h + gs13, ids=ids)
    if stride:
        hidden = torch.cat((hidden, torch.randn(t, stride).to(dtype)), 1)[:, :h]
    prepared = ops.prepare_moe_int8_weights(*w13, *w2, gs13, gs2)
    out = ops.fused_moe_int8_prepared(hidden, prepared, tw, ti, activation)
    assert out.shape == hidden.shape and out.dtype == dtype
    exact = ops_native.fused_moe_int8(hidden.double(), *w13, *w2, tw, ti, gs13, gs2, activation)
    native = same_precision_moe(hidden, ops_native.moe_int8_dequantize(*w13, gs13).to(dtype),
                                ops_native.moe_int8_dequantize(*w2, gs2).to(dtype), tw, ti,
                                activation)
    assert_close_to_ref(out, native, exact, what=f"fused_moe_int8 {name} {dtype} gs={gs13}/{gs2} "
                        f"offsets={offsets}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gs", GROUPS, ids=[f"{a}-{b}" for a, b in GROUPS])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_moe_int8_kernel(name, gs, dtype):
    _run(name, dtype, *gs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_moe_int8_without_offsets(dtype):
    _run("e3-topk-equals-e", dtype, 32, 32, offsets=False)
    _run("one-token", dtype, -1, 16, offsets=False)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_int8_activations_fp16(activation):
    _run("two-tokens-odd-sizes", torch.float16, 32, 16, activation=activation)


def test_fused_moe_int8_strided_rows_equal_contiguous():
    a = _run("prefill", torch.bfloat16, 32, 16)
    torch.testing.assert_close(a, _run("prefill", torch.bfloat16, 32, 16, stride=7), rtol=0, atol=0)


def test_fused_moe_int8_more_tokens_than_a_chunk():
    # 1100 tokens: two passes of the kernel's 1024-token chunk
    hidden, w13, w2, tw, ti = make_int8_moe(1100, 32, 16, 3, 2, 16, dtype=torch.bfloat16, seed=3)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 16)
    out = ops.fused_moe_int8_prepared(hidden, p, tw, ti)
    exact = ops_native.fused_moe_int8(hidden.double(), *w13, *w2, tw, ti, 16, 16)
    native = same_precision_moe(hidden, ops_native.moe_int8_dequantize(*w13, 16).bfloat16(),
                                ops_native.moe_int8_dequantize(*w2, 16).bfloat16(), tw, ti)
    assert_close_to_ref(out, native, exact, what="fused_moe_int8 1100 tokens")


def test_fused_moe_int8_zero_tokens_and_bad_ids():
    hidden, w13, w2, tw, ti = make_int8_moe(0, 64, 32, 4, 2, 32)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 32)
    assert ops.fused_moe_int8_prepared(hidden, p, tw, ti).shape == (0, 64)
    hidden, w13, w2, tw, ti = make_int8_moe(3, 64, 32, 4, 2, 32)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 32)
    with pytest.raises(ValueError, match="expert ids"):
        ops.fused_moe_int8_prepared(hidden, p, tw, ti + 10)


def test_fused_moe_int8_op_errors_and_opcheck():
    hidden, w13, w2, tw, ti = make_int8_moe(5, 64, 48, 4, 2, 32, 16, dtype=torch.bfloat16)
    p = ops.prepare_moe_int8_weights(*w13, *w2, 32, 16)
    out = torch.empty_like(hidden)
    args = [out, hidden, p.w13, p.w2, p.w13_scales_offsets, p.w2_scales_offsets, tw, ti, 48, 32,
            16, "silu"]
    torch.library.opcheck(torch.ops.octavo.fused_moe_int8_packed.default, tuple(args))
    op = torch.ops.octavo.fused_moe_int8_packed
    with pytest.raises(RuntimeError, match="w13_packed"):
        op(*args[:8], 70, 32, 16, "silu")                   # inter size that is not the packed one
    with pytest.raises(RuntimeError, match="group_size13"):
        op(*args[:9], 0, 16, "silu")
    with pytest.raises(RuntimeError, match="w2_scales_offsets"):
        op(*args[:9], 32, 32, "silu")                       # w2 packed in 16-groups, not 32
    with pytest.raises(RuntimeError, match="activation"):
        op(*args[:11], "relu")
    with pytest.raises(RuntimeError, match="w13_packed must be a contiguous int8"):
        op(*args[:2], p.w13.view(torch.uint8), *args[3:])


VARIANT_SCRIPT = r"""
import torch
import test_moe_int8 as m
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for name, gs in (("one-token", (32, 32)), ("two-tokens-odd-sizes", (-1, -1)),
                     ("e3-topk-equals-e", (32, 16)), ("prefill", (128, 64))):
        m._run(name, dtype, *gs)
    m._run("all-on-one", dtype, 16, 16, offsets=False)
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2")],
                         ids=["default", "avx2"])
def test_variant(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_fused_moe_int8_lab_quick():
    # the kernel lab (bench/kernels/fused_moe_int8.py, driven by fused_moe_fp8's) runs end to end
    import re
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.fused_moe_int8", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and res.stdout.count("OK") == 4
    assert len(re.findall(r"octavo.fused_moe_int8 +[\d.]+ ms +[\d.]+ GB/s", res.stdout)) == 4
