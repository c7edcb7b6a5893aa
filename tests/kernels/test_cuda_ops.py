"""CUDA kernels (rms_norm, fused_add_rms_norm, silu/gelu_and_mul, rotary_embedding,
reshape_and_cache) vs octavo.ops_native on a GPU. Skipped where torch.cuda is unavailable; the
same kernels run under the SIMT emulator on the CPU in tests/simt."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 769), (33, 4096), (5, 5125)])
def test_rms_norms_cuda(dtype, num_tokens, hidden):
    torch.manual_seed(0)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.rand(hidden, dtype=dtype, device="cuda") + 0.5
    assert_close_to_ref(ops.rms_norm(x, w, 1e-6), ops_native.rms_norm(x, w, 1e-6),
                        ops_native.rms_norm(x.double(), w.double(), 1e-6))
    xk, rk, xn, rn, xe, re = x.clone(), r.clone(), x.clone(), r.clone(), x.double(), r.double()
    ops.fused_add_rms_norm(xk, rk, w, 1e-6)
    ops_native.fused_add_rms_norm(xn, rn, w, 1e-6)
    ops_native.fused_add_rms_norm(xe, re, w.double(), 1e-6)
    assert_close_to_ref(rk, rn, re)
    assert_close_to_ref(xk, xn, xe)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [1, 769, 2816])
def test_act_and_mul_cuda(dtype, d):
    x = torch.randn(9, 2 * d, dtype=dtype, device="cuda") * 3
    assert_close_to_ref(ops.silu_and_mul(x), ops_native.silu_and_mul(x), ops_native.silu_and_mul(x.double()))
    for approx in ("none", "tanh"):
        assert_close_to_ref(ops.gelu_and_mul(x, approx), ops_native.gelu_and_mul(x, approx),
                            ops_native.gelu_and_mul(x.double(), approx))


def test_opcheck_cuda():
    x = torch.randn(5, 96, device="cuda")
    w = torch.randn(96, device="cuda")
    torch.library.opcheck(torch.ops.octavo.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.octavo.silu_and_mul.default, (torch.empty(5, 48, device="cuda"), x))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (80, 20), (128, 64)])
def test_rotary_cuda(dtype, is_neox, head_size, rot_dim):
    torch.manual_seed(0)
    num_tokens, hq, hk, max_pos = 13, 8, 2, 500
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().cuda()
    positions = torch.randint(0, max_pos, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_size, dtype=dtype, device="cuda")
    split = (hq * head_size, hk * head_size, hk * head_size)
    outs = []
    for mod, buf in ((ops, qkv.clone()), (ops_native, qkv.clone()), (ops_native, qkv.double())):
        q, k, _ = buf.split(split, dim=1)
        mod.rotary_embedding(positions, q, k, head_size, cache, is_neox)
        outs.append(buf)
    assert_close_to_ref(outs[0], outs[1], outs[2])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_reshape_and_cache_cuda(dtype):
    torch.manual_seed(0)
    num_tokens, hk, hd, block_size, num_blocks = 11, 3, 40, 4, 12
    kv = torch.randn(num_tokens, 2, hk, hd, dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::4] = -1
    caches = [torch.randn(num_blocks, block_size, hk, hd, dtype=dtype, device="cuda") for _ in range(2)]
    ref = [c.clone() for c in caches]
    ops.reshape_and_cache(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    ops_native.reshape_and_cache(kv[:, 0], kv[:, 1], ref[0], ref[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
