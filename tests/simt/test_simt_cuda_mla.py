"""The csrc/cuda MLA attention kernel (paged latent cache, one warp per head) under the SIMT
emulator (torch.ops.octavo_simt.mla_paged_attention) against octavo.ops_native, tolerances as
tests/kernels."""
import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native
from test_mla import cast, latent_batch

# (q_len, seq_len): decode, chunked prefill rows after a context, a prompt, an empty sequence
SEQS = [(1, 1), (1, 19), (5, 21), (0, 7), (3, 3)]


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,lora,rope,block_size", [(4, 24, 8, 16), (5, 40, 16, 8),
                                                         (2, 33, 6, 4)])
def test_mla_paged_attention(simt, dtype, heads, lora, rope, block_size):
    batch = latent_batch(SEQS, heads, lora, rope, block_size, seed=heads + lora)
    b = cast(batch, dtype)
    out = torch.full((b["q"].shape[0], heads, lora), float("nan"), dtype=dtype)
    simt.mla_paged_attention(out, b["q"], b["kv_cache"], b["query_start_loc"], b["seq_lens"],
                             b["block_table"], b["scale"], lora)
    native = ops_native.mla_paged_attention(**b)
    exact = ops_native.mla_paged_attention(**cast(batch, torch.float64))
    assert torch.isfinite(out).all()   # every row written, unwritten (NaN) cache never read
    assert_close_to_ref(out, native, exact, what=f"emulated mla_paged_attention {dtype}")


def test_mla_paged_attention_strided_q_and_padding_rows(simt):
    """q as a slice of a wider tensor; rows past the last sequence (padding) are left alone."""
    batch = latent_batch(SEQS, 4, 24, 8, 16, seed=3)
    wide = torch.randn(batch["q"].shape[0] + 2, 4, 40)
    wide[:-2, :, :32] = batch["q"]
    q = wide[..., :32]
    out = torch.full((q.shape[0], 4, 24), 7.0)
    simt.mla_paged_attention(out, q, batch["kv_cache"], batch["query_start_loc"],
                             batch["seq_lens"], batch["block_table"], batch["scale"], 24)
    ref = ops_native.mla_paged_attention(**batch)
    torch.testing.assert_close(out[:-2], ref, atol=1e-5, rtol=1e-5)
    assert (out[-2:] == 7.0).all()


def test_shared_memory_limit_is_an_error(simt):
    q = torch.zeros(1, 1, 4096)
    out = torch.zeros(1, 1, 4000)
    with pytest.raises(RuntimeError, match="shared memory"):
        simt.mla_paged_attention(out, q, torch.zeros(1, 16, 4096), torch.tensor([0, 1]).int(),
                                 torch.tensor([1]).int(), torch.zeros(1, 1).int(), 1.0, 4000)
