"""The CUDA weight-only INT8 GEMM and fused MoE over int8 experts (csrc/cuda/int8_woq_gemm.cu,
moe_int8.cu) through ops.int8_woq_gemm_prepared / ops.fused_moe_int8_prepared on a GPU, against
octavo.ops_native, on larger shapes than the emulator runs (M 1..300, K up to 4096, E = 8), plus
the fallback for groups the kernels do not take, opcheck and CUDA-graph capture. Skipped where
torch.cuda is unavailable; the same kernels run under the SIMT emulator on the CPU in
tests/simt/test_simt_cuda_int8_woq.py."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native
from test_int8_gemm import make_woq
from test_moe import same_precision_moe
from test_moe_int8 import make_int8_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 4096, 4096), (7, 1000, 520), (16, 2048, 1024), (33, 768, 4096), (300, 300, 768)]


def _woq_case(m, n, k, group_size, offsets, dtype, bias=False):
    q, s, off = make_woq(n, k, group_size, offsets, seed=m)
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, q, s, off, b


def _on_cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("group_size", [16, 32, 128, -1])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_int8_woq_gemm_cuda(shape, offsets, group_size, dtype):
    m, n, k = shape
    x, q, s, off, b = _woq_case(m, n, k, group_size, offsets, dtype, bias=offsets)
    assert ops.int8_woq_cuda_supported(dtype, k, group_size)
    qc, sc, oc = _on_cuda(q, s, off)
    w = ops_native.int8_woq_prepare(qc, sc, oc, group_size)
    out = ops.int8_woq_gemm_prepared(x.cuda(), w, None if b is None else b.cuda())
    native = ops_native.int8_woq_gemm(x, q, s, off, group_size, b)
    exact = ops_native.int8_woq_gemm(x.double(), q, s, off, group_size,
                                     None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out.cpu(), native, exact,
                        what=f"cuda int8 woq {dtype} gs={group_size} offsets={offsets} {shape}")


def test_int8_woq_unsupported_groups_fall_back_cuda():
    # groups of 8 are not whole mma K steps: the reference runs (the op itself refuses them)
    x, q, s, off, _ = _woq_case(5, 64, 96, 8, True, torch.bfloat16)
    assert not ops.int8_woq_cuda_supported(torch.bfloat16, 96, 8)
    w = ops_native.int8_woq_prepare(*_on_cuda(q, s, off), 8)
    out = ops.int8_woq_gemm_prepared(x.cuda(), w)
    exact = ops_native.int8_woq_gemm(x.double(), q, s, off, 8)
    assert_close_to_ref(out.cpu(), ops_native.int8_woq_gemm(x, q, s, off, 8), exact, what="fallback")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.octavo.int8_woq_gemm(torch.empty(5, 64, dtype=torch.bfloat16, device="cuda"),
                                       x.cuda(), w.packed, w.scales_offsets, 8, None)


# (T, H, I, E, k): decode (few pairs) and prefill shapes, I and H off the panels
MOE_SHAPES = [(1, 1024, 704, 8, 2), (7, 2048, 1400, 8, 2), (64, 1024, 720, 6, 3), (300, 512, 360, 8, 2)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("gs", [(32, 32), (32, 16), (128, 64), (-1, -1)], ids=str)
@pytest.mark.parametrize("shape", MOE_SHAPES,
                         ids=[f"T{t}-H{h}-I{i}-E{e}-k{k}" for t, h, i, e, k in MOE_SHAPES])
def test_fused_moe_int8_cuda(shape, gs, dtype):
    t, h, i, e, k = shape
    hidden, w13, w2, tw, ti = make_int8_moe(t, h, i, e, k, *gs, dtype=dtype, seed=t)
    assert ops.moe_int8_kernel_takes(torch.device("cuda"), dtype, h, i,
                                     ops_native.int4_groups(h, gs[0])[0],
                                     ops_native.int4_groups(i, gs[1])[0])
    p = ops.prepare_moe_int8_weights(*_on_cuda(*w13), *_on_cuda(*w2), *gs)
    out = ops.fused_moe_int8_prepared(hidden.cuda(), p, tw.cuda(), ti.cuda())
    exact = ops_native.fused_moe_int8(hidden.double(), *w13, *w2, tw, ti, *gs)
    native = same_precision_moe(hidden, ops_native.moe_int8_dequantize(*w13, gs[0]).to(dtype),
                                ops_native.moe_int8_dequantize(*w2, gs[1]).to(dtype), tw, ti, "silu")
    assert out.dtype == dtype and out.shape == hidden.shape
    assert_close_to_ref(out.cpu(), native, exact, what=f"cuda fused_moe_int8 {dtype} gs={gs} {shape}")


def test_opcheck_and_graph_capture_cuda():
    x, q, s, off, _ = _woq_case(4, 512, 256, 32, True, torch.bfloat16)
    w = ops_native.int8_woq_prepare(*_on_cuda(q, s, off), 32)
    xb = x.cuda()
    out = torch.empty(4, 512, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.octavo.int8_woq_gemm,
                          (out, xb, w.packed, w.scales_offsets, 32, None))
    hidden, w13, w2, tw, ti = make_int8_moe(4, 256, 160, 4, 2, 32, 16, dtype=torch.bfloat16)
    p = ops.prepare_moe_int8_weights(*_on_cuda(*w13), *_on_cuda(*w2), 32, 16)
    hc, twc, tic = hidden.cuda(), tw.cuda(), ti.cuda()
    torch.library.opcheck(torch.ops.octavo.fused_moe_int8_packed,
                          (torch.empty_like(hc), hc, p.w13, p.w2, p.w13_scales_offsets,
                           p.w2_scales_offsets, twc, tic, 160, p.group_size13, p.group_size2, "silu"))
    # one decode step's worth captured and replayed with new activations and routing
    static_x, static_h = xb.clone(), hc.clone()
    ops.int8_woq_gemm_prepared(static_x, w)
    ops.fused_moe_int8_prepared(static_h, p, twc, tic)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.int8_woq_gemm_prepared(static_x, w)
        z = ops.fused_moe_int8_prepared(static_h, p, twc, tic)
    static_x.copy_(torch.randn(4, 256, device="cuda").bfloat16())
    static_h.copy_(torch.randn(4, 256, device="cuda").bfloat16())
    tic.copy_(tic.flip(1))
    graph.replay()
    torch.testing.assert_close(y, ops.int8_woq_gemm_prepared(static_x, w), rtol=0, atol=0)
    torch.testing.assert_close(z, ops.fused_moe_int8_prepared(static_h, p, twc, tic), rtol=0, atol=0)
