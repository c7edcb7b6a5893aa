"""The CUDA INT4 weight-only and INT8 W8A8 GEMMs (csrc/cuda/int{4,8}_gemm.cu) through ops.*_prepared
on a GPU, against octavo.ops_native, on larger shapes than the emulator runs (M 1..300, K up to
4096), plus opcheck and CUDA-graph capture. Skipped where torch.cuda is unavailable; the same
kernels run under the SIMT emulator on the CPU in tests/simt/test_simt_cuda_int{4,8}.py."""
import pytest
import torch

from kernel_utils import assert_close_to_ref
from octavo import ops, ops_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 4096, 4096), (7, 1000, 520), (16, 2048, 1024), (33, 768, 4096), (300, 300, 768)]


def _int4_case(m, n, k, group_size, zeros, seed=0):
    g = torch.Generator().manual_seed(seed + m + n + k)
    _, groups = ops_native.int4_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, groups, generator=g) + 0.5) / (8 * k ** 0.5)
    z = torch.randint(0, 16, (n, groups), generator=g).float() if zeros else None
    return torch.randn(m, k, generator=g), q, s, z


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_gemm_cuda(dtype, group_size, zeros, shape):
    m, n, k = shape
    x, q, s, z = _int4_case(m, n, k, group_size, zeros)
    w = ops_native.int4_prepare(q.cuda(), s.cuda(), None if z is None else z.cuda(), group_size)
    xd = x.to(dtype).cuda()
    out = ops.int4_gemm_prepared(xd, w)
    native = ops_native.int4_gemm(xd.cpu(), q, s, z, group_size)
    exact = ops_native.int4_gemm(xd.cpu().double(), q, s, z, group_size)
    assert_close_to_ref(out.cpu(), native, exact, what=f"cuda int4 {dtype} gs={group_size} {shape}")


def test_int4_act_order_cuda():
    m, n, k, gs = 5, 256, 512, 128
    x, q, s, z = _int4_case(m, n, k, gs, True)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k)].int()
    w = ops_native.int4_prepare(q.cuda(), s.cuda(), z.cuda(), gs, g_idx.cuda())
    w = w._replace(perm=w.perm.cuda())
    xd = x.bfloat16().cuda()
    out = ops.int4_gemm_prepared(xd, w)
    native = ops_native.int4_gemm(xd.cpu(), q, s, z, gs, g_idx)
    exact = ops_native.int4_gemm(xd.cpu().double(), q, s, z, gs, g_idx)
    assert_close_to_ref(out.cpu(), native, exact, what="cuda int4 act-order")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric", "static"])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_gemm_cuda(dtype, mode, shape):
    m, n, k = shape
    g = torch.Generator().manual_seed(m + n + k)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = (torch.rand(n, generator=g) + 0.5) / (64 * k ** 0.5)
    x = (torch.randn(m, k, generator=g) + 0.3).to(dtype)
    scale = torch.tensor(0.02) if mode == "static" else None
    w = ops_native.int8_prepare(wq.cuda(), ws.cuda())
    out = ops.int8_gemm_prepared(x.cuda(), w, None, mode == "asymmetric",
                                 None if scale is None else scale.cuda())
    ref = ops_native.int8_gemm(x, wq, ws, None, mode == "asymmetric", scale)
    # integer products are exact and every fp32 rounding is the reference's
    assert torch.equal(out.cpu(), ref), (out.cpu().double() - ref.double()).abs().max().item()


def test_opcheck_and_graph_capture_cuda():
    x, q, s, z = _int4_case(4, 512, 256, 64, True)
    w4 = ops_native.int4_prepare(q.cuda(), s.cuda(), z.cuda(), 64)
    xb = x.bfloat16().cuda()
    out = torch.empty(4, 512, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.octavo.int4_gemm, (out, xb, w4.packed, w4.scales_offsets, 64, None))
    w8 = ops_native.int8_prepare(torch.randint(-128, 128, (512, 256), dtype=torch.int8).cuda(),
                                 torch.rand(512).cuda())
    torch.library.opcheck(torch.ops.octavo.int8_gemm,
                          (out, xb, w8.packed, w8.scales, w8.colsum, None, None, False, None))
    # one decode step's worth captured and replayed with new activations
    static_x = xb.clone()
    ops.int4_gemm_prepared(static_x, w4)
    ops.int8_gemm_prepared(static_x, w8)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y4 = ops.int4_gemm_prepared(static_x, w4)
        y8 = ops.int8_gemm_prepared(static_x, w8)
    static_x.copy_(torch.randn(4, 256, device="cuda").bfloat16())
    graph.replay()
    torch.testing.assert_close(y4, ops.int4_gemm_prepared(static_x, w4), rtol=0, atol=0)
    torch.testing.assert_close(y8, ops.int8_gemm_prepared(static_x, w8), rtol=0, atol=0)
