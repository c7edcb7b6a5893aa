"""reshape_and_cache kernel vs octavo.ops_native (slot -1 skipped, untouched slots kept)."""
import pytest
import torch

from kernel_utils import ALL_DTYPES
from octavo import ops, ops_native


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 64), (4, 80), (8, 128)])
@pytest.mark.parametrize("strided", [False, True])
def test_reshape_and_cache(dtype, block_size, num_kv_heads, head_size, strided):
    torch.manual_seed(block_size + head_size)
    num_tokens, num_blocks = 37, 9
    if strided:  # key/value as slices of a fused qkv projection
        qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_size, dtype=dtype)
        key = qkv[:, num_kv_heads * head_size: 2 * num_kv_heads * head_size].view(num_tokens, num_kv_heads, head_size)
        value = qkv[:, 2 * num_kv_heads * head_size:].view(num_tokens, num_kv_heads, head_size)
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::5] = -1  # padding tokens
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    kc, vc = torch.full(shape, 7.0, dtype=dtype), torch.full(shape, -7.0, dtype=dtype)
    kc_n, vc_n = kc.clone(), vc.clone()
    ops.reshape_and_cache(key, value, kc, vc, slots)
    ops_native.reshape_and_cache(key, value, kc_n, vc_n, slots)
    assert torch.equal(kc, kc_n) and torch.equal(vc, vc_n)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (kc.view(-1, num_kv_heads, head_size)[~written] == 7.0).all()
    assert (vc.view(-1, num_kv_heads, head_size)[~written] == -7.0).all()


def test_errors():
    k = torch.randn(4, 2, 16)
    kc = torch.zeros(2, 16, 2, 16)
    with pytest.raises(RuntimeError, match="slot"):
        ops.reshape_and_cache(k, k, kc, kc.clone(), torch.tensor([0, 1, 2, 32]))
    with pytest.raises(RuntimeError, match="int64"):
        ops.reshape_and_cache(k, k, kc, kc.clone(), torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.reshape_and_cache(k, k, kc.bfloat16(), kc.bfloat16(), torch.tensor([0, 1, 2, 3]))


def test_opcheck():
    k = torch.randn(5, 2, 32)
    kc = torch.zeros(3, 16, 2, 32)
    torch.library.opcheck(torch.ops.octavo.reshape_and_cache.default,
                          (k, k.clone(), kc, kc.clone(), torch.tensor([0, 17, -1, 5, 40])))
