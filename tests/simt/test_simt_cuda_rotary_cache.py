"""rotary_embedding and reshape_and_cache CUDA kernels under the SIMT emulator vs
octavo.ops_native (tolerance rule of tests/kernels for rotary; exact for the cache copy)."""
import pytest
import torch

import simt_ext
from kernel_utils import ALL_DTYPES, assert_close_to_ref
from octavo import ops_native


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (80, 20), (128, 64)])
@pytest.mark.parametrize("layout", ["fused_qkv", "heads_3d", "no_key"])
def test_rotary(simt, dtype, is_neox, head_size, rot_dim, layout):
    torch.manual_seed(head_size)
    num_tokens, hq, hk, max_pos = 7, 8, 2, 100
    cache = cos_sin_cache(max_pos, rot_dim)
    positions = torch.randint(0, max_pos, (num_tokens,))
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * head_size, dtype=dtype)

    def split(buf):
        q, k = buf[:, : hq * head_size], buf[:, hq * head_size: (hq + hk) * head_size]
        if layout == "heads_3d":
            return q.view(num_tokens, hq, head_size), k.view(num_tokens, hk, head_size)
        return q, None if layout == "no_key" else k

    emu = qkv.clone()
    qe, ke = split(emu)
    simt.rotary_embedding(positions, qe, ke, head_size, cache, is_neox)
    qn, kn = (None if t is None else t.clone() for t in split(qkv))
    ops_native.rotary_embedding(positions, qn, kn, head_size, cache, is_neox)
    qx, kx = (None if t is None else t.double() for t in split(qkv))
    ops_native.rotary_embedding(positions, qx, kx, head_size, cache, is_neox)
    assert_close_to_ref(qe, qn, qx, what="query")
    if kx is not None:
        assert_close_to_ref(ke, kn, kx, what="key")
    untouched = (hq + hk) * head_size if kx is not None else hq * head_size
    assert torch.equal(emu[:, untouched:], qkv[:, untouched:])
    if rot_dim < head_size:  # dims past rot_dim untouched
        q3 = qe.reshape(num_tokens, hq, head_size)
        assert torch.equal(q3[..., rot_dim:], qkv[:, : hq * head_size].view(num_tokens, hq, head_size)[..., rot_dim:])


def test_rotary_cache_in_query_dtype_and_bad_position(simt):
    q = torch.randn(3, 2 * 64, dtype=torch.bfloat16)
    cache = cos_sin_cache(10, 64).bfloat16()
    q1, q2 = q.clone(), q.clone()
    simt.rotary_embedding(torch.tensor([0, 4, 9]), q1, None, 64, cache, True)
    ops_native.rotary_embedding(torch.tensor([0, 4, 9]), q2, None, 64, cache, True)
    assert torch.equal(q1, q2)
    with pytest.raises(RuntimeError, match=r"rotary_embedding_kernel.*block \(1,0,0\).*position out of range"):
        simt.rotary_embedding(torch.tensor([0, 10, 1]), q1, None, 64, cache, True)
    with pytest.raises(RuntimeError, match="rot_dim 64 must be even and <= head_size 32"):
        simt.rotary_embedding(torch.tensor([0, 1, 2]), q1, None, 32, cache, True)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
# head sizes 40/128/8 allow 16-byte copies; 20 (16-bit types) and 6 take the scalar path
@pytest.mark.parametrize("num_kv_heads,head_size,block_size", [(3, 40, 4), (1, 128, 16), (8, 8, 1),
                                                            (2, 20, 3), (2, 6, 3)])
def test_reshape_and_cache(simt, dtype, num_kv_heads, head_size, block_size):
    torch.manual_seed(head_size)
    num_tokens, num_blocks = 11, 12
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_size, dtype=dtype)
    key, value = kv[:, 0], kv[:, 1]  # strided views of one buffer
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::4] = -1  # padding tokens are skipped
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_size, dtype=dtype) for _ in range(2)]
    emu = [c.clone() for c in caches]
    simt.reshape_and_cache(key, value, emu[0], emu[1], slots)
    ops_native.reshape_and_cache(key, value, caches[0], caches[1], slots)
    assert torch.equal(emu[0], caches[0]) and torch.equal(emu[1], caches[1])


def test_reshape_and_cache_bad_slot(simt):
    key = torch.randn(2, 1, 8)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match=r"block \(1,0,0\).*slot >= num_blocks \* block_size"):
        simt.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="must be a CPU tensor"):
        simt.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([0, 8]).to("meta"))
