"""Fused MoE with e4m3 experts: the reference (ops_native.fused_moe_fp8) vs a dense fp64 einsum on
the dequantized weights, then the CPU kernel (fp8 codes widened in registers inside the fused
MoE loops) vs the reference for block (128 x 128), per-channel and per-tensor scales with fp32,
bf16 and fp16 activations, on every CPU variant."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import assert_close_to_ref
from test_moe import dense_moe, make_moe, same_precision_moe
from octavo import ops, ops_native

BLOCK = (128, 128)


def quantize_experts(w: torch.Tensor, kind: str):
    """[E, N, K] float -> (e4m3 [E, N, K], scales as stacked checkpoints store them: [E] per
    tensor, [E, N, 1] per channel, [E, ceil(N/128), ceil(K/128)] per block)."""
    qs, ss = [], []
    for x in range(w.shape[0]):
        if kind == "tensor":
            s = (w[x].float().abs().amax() / ops_native.FP8_MAX).reshape(())
            q = ops_native.fp8_quantize(w[x], s)
        else:
            q, s = ops_native.fp8_quantize_weight(w[x], BLOCK if kind == "block" else None)
        qs.append(q)
        ss.append(s)
    return torch.stack(qs), torch.stack(ss)


def dequantize_experts(q, s, kind):
    block = BLOCK if kind == "block" else None
    return torch.stack([ops_native.fp8_dequantize(q[x], s[x], block) for x in range(q.shape[0])])


def make_fp8_moe(t, h, i, e, k, dtype, kind, seed=0, ids=None):
    hidden, w13, w2, tw, ti = make_moe(t, h, i, e, k, torch.float32, seed=seed, ids=ids)
    q13, s13 = quantize_experts(w13, kind)
    q2, s2 = quantize_experts(w2, kind)
    return hidden.to(dtype), q13, q2, s13, s2, tw, ti


# (T, H, I, E, k, ids): as test_moe's cases, plus sizes spanning several 128-blocks that are not
# whole (H 300: 3 blocks; I 200: gate and up blocks meet inside a 64-row panel of w13)
CASES = {
    "one-token": (1, 64, 64, 4, 2, None),
    "idle-experts": (3, 96, 80, 8, 1, torch.tensor([[5], [2], [5]])),
    "e5-odd-sizes": (17, 67, 33, 5, 2, None),
    "blocks": (9, 300, 200, 6, 2, None),
    "prefill-blocks": (130, 256, 136, 4, 2, None),
}
KINDS = ("block", "channel", "tensor")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_vs_dense_on_dequantized_weights(kind):
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(7, 300, 200, 5, 2, torch.float64, kind)
    out = ops_native.fused_moe_fp8(hidden, q13, q2, s13, s2, tw, ti, "silu",
                                   BLOCK if kind == "block" else None)
    dense = dense_moe(hidden, dequantize_experts(q13, s13, kind), dequantize_experts(q2, s2, kind), tw, ti)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_row_scales_and_packing_round_trip():
    _, q13, q2, s13, s2, _, _ = make_fp8_moe(1, 300, 200, 3, 1, torch.float32, "block")
    r13, bk13 = ops_native.fp8_moe_row_scales(s13, 400, 300, BLOCK)
    r2, bk2 = ops_native.fp8_moe_row_scales(s2, 300, 200, BLOCK)
    assert (bk13, bk2) == (128, 128) and r13.shape == (3, 400, 3) and r2.shape == (3, 300, 2)
    assert torch.equal(r13[:, 200:256], s13[:, 1:2].expand(3, 56, 3))   # rows 128..255: block 1
    p13, p2 = ops_native.pack_moe_fp8_scales(r13, r2)
    assert p13.shape == (3, 4, 2, 3, 64) and p2.shape == (3, 5, 2, 64)
    back13, back2 = ops_native.unpack_moe_fp8_scales(p13, p2, 300, 200)
    assert torch.equal(back13, r13) and torch.equal(back2, r2)
    prepared = ops.prepare_moe_fp8_weights(q13, q2, s13, s2, BLOCK)
    w13, w2, u13, u2, block = ops.unpack_moe_fp8_weights(prepared)
    assert torch.equal(w13.view(torch.uint8), q13.view(torch.uint8))
    assert torch.equal(w2.view(torch.uint8), q2.view(torch.uint8))
    assert torch.equal(u13, r13) and torch.equal(u2, r2) and block in (None, (1, 128))


def _run(name, dtype, kind, activation="silu", prepared=True, stride=0):
    t, h, i, e, k, ids = CASES[name]
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(t, h, i, e, k, dtype, kind, seed=t + h, ids=ids)
    if stride:
        hidden = torch.cat((hidden, torch.randn(t, stride).to(dtype)), 1)[:, :h]
    block = BLOCK if kind == "block" else None
    if prepared:
        out = ops.fused_moe_fp8_prepared(
            hidden, ops.prepare_moe_fp8_weights(q13, q2, s13, s2, block), tw, ti, activation)
    else:
        out = ops.fused_moe_fp8(hidden, q13, q2, s13, s2, tw, ti, activation, block)
    assert out.shape == hidden.shape and out.dtype == dtype
    exact = ops_native.fused_moe_fp8(hidden.double(), q13, q2, s13, s2, tw, ti, activation, block)
    w13, w2 = dequantize_experts(q13, s13, kind), dequantize_experts(q2, s2, kind)
    native = same_precision_moe(hidden, w13.to(dtype), w2.to(dtype), tw, ti, activation)
    assert_close_to_ref(out, native, exact, what=f"fused_moe_fp8 {name} {dtype} {kind} {activation}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_moe_fp8_kernel(name, kind, dtype):
    _run(name, dtype, kind)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_moe_fp8_kernel_activations_fp16(activation):
    _run("blocks", torch.float16, "block", activation)


def test_fused_moe_fp8_unprepared_and_strided():
    a = _run("blocks", torch.bfloat16, "block", prepared=False)
    torch.testing.assert_close(a, _run("blocks", torch.bfloat16, "block", stride=7), rtol=0, atol=0)


def test_fused_moe_fp8_kernel_zero_tokens():
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(0, 32, 16, 4, 2, torch.bfloat16, "channel")
    assert ops.fused_moe_fp8(hidden, q13, q2, s13, s2, tw, ti).shape == (0, 32)


def test_fused_moe_fp8_errors():
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(3, 64, 48, 4, 2, torch.float32, "channel")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ops.fused_moe_fp8(hidden, q13.float(), q2, s13, s2, tw, ti)
    with pytest.raises(ValueError, match="per-channel"):
        ops.fused_moe_fp8(hidden, q13, q2, s13[:, :5], s2, tw, ti)
    with pytest.raises(ValueError, match="even number of columns"):
        ops.fused_moe_fp8(hidden, q13, q2, torch.ones(4, 96, 13), torch.ones(4, 64, 10), tw, ti,
                          block_size=(1, 5))
    with pytest.raises(ValueError, match="expert ids"):
        ops.fused_moe_fp8(hidden, q13, q2, s13, s2, tw, ti + 10)


def test_fused_moe_fp8_opcheck():
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(5, 40, 24, 4, 2, torch.bfloat16, "block")
    p = ops.prepare_moe_fp8_weights(q13, q2, s13, s2, BLOCK)
    torch.library.opcheck(torch.ops.octavo.fused_moe_fp8_packed.default,
                          (torch.empty_like(hidden), hidden, p.w13, p.w2, p.w13_scale, p.w2_scale,
                           tw, ti, 24, p.block_k13, p.block_k2, "silu"))


VARIANT_SCRIPT = r"""
import torch
import test_moe_fp8
for dtype in (torch.float32, torch.bfloat16):
    for kind in test_moe_fp8.KINDS:
        test_moe_fp8._run("blocks", dtype, kind)
    test_moe_fp8._run("e5-odd-sizes", dtype, "channel")
print("ok")
"""


@pytest.mark.parametrize("env", [dict(ATEN_CPU_CAPABILITY="default"), dict(ATEN_CPU_CAPABILITY="avx2")],
                         ids=["default", "avx2"])
def test_fused_moe_fp8_variants(env):
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_unpacked_op_equals_packed():
    # octavo.fused_moe_fp8 (the CUDA form: codes as loaded, scales per row) packs on each CPU call
    t, h, i, e, k, ids = CASES["blocks"]
    hidden, q13, q2, s13, s2, tw, ti = make_fp8_moe(t, h, i, e, k, torch.bfloat16, "block", ids=ids)
    r13, bk13 = ops_native.fp8_moe_row_scales(s13, 2 * i, h, BLOCK)
    r2, bk2 = ops_native.fp8_moe_row_scales(s2, h, i, BLOCK)
    out = torch.empty_like(hidden)
    torch.ops.octavo.fused_moe_fp8(out, hidden, q13, q2, r13, r2, tw, ti, bk13, bk2, "silu")
    packed = ops.fused_moe_fp8(hidden, q13, q2, s13, s2, tw, ti, "silu", BLOCK)
    torch.testing.assert_close(out, packed, rtol=0, atol=0)
    # (opcheck's schema test cannot multiply float8 tensors: the codes go as uint8)
    torch.library.opcheck(torch.ops.octavo.fused_moe_fp8.default,
                          (out, hidden, q13.view(torch.uint8), q2.view(torch.uint8), r13, r2, tw,
                           ti, bk13, bk2, "gelu"))
    with pytest.raises(RuntimeError, match="scales must be"):
        torch.ops.octavo.fused_moe_fp8(out, hidden, q13, q2, r13[:, 1:], r2, tw, ti, bk13, bk2, "silu")


def test_fused_moe_fp8_lab_quick():
    # the kernel lab (bench/kernels/fused_moe_fp8.py) runs end to end and its checks pass
    import re
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.fused_moe_fp8", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and res.stdout.count("OK") == 4
    assert len(re.findall(r"octavo.fused_moe_fp8 +[\d.]+ ms +[\d.]+ GB/s", res.stdout)) == 4
