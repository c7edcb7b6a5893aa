"""rotary_embedding kernel vs octavo.ops_native: neox/GPT-J, partial rotary, strided views."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops, ops_native


def cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_frac", [(64, 1.0), (80, 1.0), (128, 1.0), (128, 0.5), (80, 0.25)])
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "heads_3d", "no_key"])
def test_rotary(dtype, is_neox, head_size, rot_frac, layout):
    torch.manual_seed(head_size)
    num_tokens, hq, hk, max_pos = 13, 8, 2, 500
    rot_dim = int(head_size * rot_frac)
    cache = cos_sin_cache(max_pos, rot_dim)
    positions = torch.randint(0, max_pos, (num_tokens,))
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_size, dtype=dtype)
    if layout == "fused_qkv":  # non-contiguous views with a token stride of the whole qkv row
        q, k = qkv[:, : hq * head_size], qkv[:, hq * head_size: (hq + hk) * head_size]
    elif layout == "heads_3d":
        q = qkv[:, : hq * head_size].view(num_tokens, hq, head_size)
        k = qkv[:, hq * head_size: (hq + hk) * head_size].view(num_tokens, hk, head_size)
    else:
        q = qkv[:, : hq * head_size].contiguous()
        k = None if layout == "no_key" else qkv[:, hq * head_size: (hq + hk) * head_size].contiguous()
    results = []
    for mod, to in ((ops, dtype), (ops_native, dtype), (ops_native, torch.float64)):
        qq = q.to(to) if to == torch.float64 else q.clone()
        kk = None if k is None else (k.to(to) if to == torch.float64 else k.clone())
        if layout == "fused_qkv" and mod is ops:  # rotate the views in place inside qkv
            buf = qkv.clone()
            qq = buf[:, : hq * head_size]
            kk = buf[:, hq * head_size: (hq + hk) * head_size]
        assert mod.rotary_embedding(positions, qq, kk, head_size, cache, is_neox) is None
        results.append((qq, kk))
        if layout == "fused_qkv" and mod is ops:  # the v part of the buffer is untouched
            assert torch.equal(buf[:, (hq + hk) * head_size:], qkv[:, (hq + hk) * head_size:])
    (qk, kk), (qn, kn), (qe, ke) = results
    assert_close_to_ref(qk, qn, qe, what="query")
    if k is not None:
        assert_close_to_ref(kk, kn, ke, what="key")
    if rot_dim < head_size:  # dims past rot_dim untouched
        q3 = qk.reshape(num_tokens, hq, head_size)
        assert torch.equal(q3[..., rot_dim:], q.reshape(num_tokens, hq, head_size)[..., rot_dim:])


def test_bf16_cache_and_errors():
    q = torch.randn(3, 2 * 64, dtype=torch.bfloat16)
    cache = cos_sin_cache(10, 64)
    q1, q2 = q.clone(), q.clone()
    ops.rotary_embedding(torch.tensor([0, 4, 9]), q1, None, 64, cache.bfloat16(), True)
    ops_native.rotary_embedding(torch.tensor([0, 4, 9]), q2, None, 64, cache.bfloat16(), True)
    torch.testing.assert_close(q1, q2)
    with pytest.raises(RuntimeError, match="position"):
        ops.rotary_embedding(torch.tensor([0, 4, 10]), q.clone(), None, 64, cache, True)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.rotary_embedding(torch.tensor([0, 4, 9]), q.clone(), None, 48, cache[:, :32], True)


def test_opcheck():
    q = torch.randn(4, 2 * 32)
    k = torch.randn(4, 32)
    torch.library.opcheck(torch.ops.octavo.rotary_embedding.default,
                          (torch.tensor([1, 2, 3, 0]), q, k, 32, cos_sin_cache(8, 32), True))
    torch.library.opcheck(torch.ops.octavo.rotary_embedding.default,
                          (torch.tensor([1, 2, 3, 0]), q.clone(), None, 32, cos_sin_cache(8, 16), False))
