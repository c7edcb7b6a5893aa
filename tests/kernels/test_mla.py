"""MLA over the paged latent cache: ops.mla_paged_attention / concat_and_cache_mla vs the
ops_native references, and the references vs ordinary multi-head paged attention over the
decompressed K/V (the absorption identity the MLA layer relies on)."""
import pytest
import torch

from attention_cases import make_batch
from kernel_utils import DTYPES, assert_close_to_ref
from octavo import ops, ops_native

# (q_len, seq_len): decode, chunked prefill, full prefill, a sequence with no rows, mixed
MIXED = [(1, 1), (1, 37), (17, 17), (5, 90), (40, 70), (1, 300), (0, 12), (3, 3)]


def latent_batch(seqs, num_heads, lora, rope, block_size, seed=0):
    """paged_attention kwargs with one kv head of size L+R, turned into MLA's arguments: q
    [T, H, L+R] and the latent cache [num_blocks, block_size, L+R] (NaN where unwritten)."""
    b = make_batch(seqs, num_heads, 1, lora + rope, block_size, torch.float32, seed=seed)
    return dict(q=b["query"], kv_cache=b["key_cache"][:, :, 0].contiguous(),
                query_start_loc=b["query_start_loc"], seq_lens=b["seq_lens"],
                block_table=b["block_table"], scale=(lora + rope) ** -0.5, kv_lora_rank=lora)


def cast(batch, dtype):
    return {k: v.to(dtype) if k in ("q", "kv_cache") else v for k, v in batch.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,lora,rope", [(4, 24, 8), (16, 512, 64), (1, 40, 16), (3, 33, 6)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mla_paged_attention_matches_reference(dtype, heads, lora, rope, block_size):
    batch = latent_batch(MIXED, heads, lora, rope, block_size, seed=heads + lora + block_size)
    b = cast(batch, dtype)
    out = ops.mla_paged_attention(**b)
    native = ops_native.mla_paged_attention(**b)
    exact = ops_native.mla_paged_attention(**cast(batch, torch.float64))
    assert out.shape == (b["q"].shape[0], heads, lora) and out.dtype == dtype
    assert torch.isfinite(out).all()   # unwritten (NaN) cache slots are never read
    assert_close_to_ref(out, native, exact, what=f"mla_paged_attention H={heads} L={lora}")


def test_reference_equals_attention_over_decompressed_kv():
    """Absorbed: softmax(scale [W_UK^T q_nope | q_pe] . [c | k_pe]) c, then W_UV. Decompressed:
    heads with K = [W_UK c | k_pe], V = W_UV c through ordinary paged attention. Equal in fp64."""
    heads, lora, rope, nope, v_dim, bs = 4, 24, 8, 16, 12, 16
    g = torch.Generator().manual_seed(0)
    batch = cast(latent_batch(MIXED, heads, lora, rope, bs, seed=1), torch.float64)
    w_uk = torch.randn(heads, nope, lora, generator=g, dtype=torch.float64)
    w_uv = torch.randn(heads, v_dim, lora, generator=g, dtype=torch.float64)
    q_nope = torch.randn(batch["q"].shape[0], heads, nope, generator=g, dtype=torch.float64)
    q_pe = batch["q"][..., lora:]
    batch["q"] = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], dim=-1)
    out = torch.einsum("thl,hvl->thv", ops_native.mla_paged_attention(**batch), w_uv)

    cache = batch["kv_cache"].nan_to_num()                         # [N, B, L+R]
    c, k_pe = cache[..., :lora], cache[..., lora:]
    k = torch.cat([torch.einsum("nbl,hdl->nbhd", c, w_uk),
                   k_pe[:, :, None].expand(-1, -1, heads, -1)], dim=-1)  # [N, B, H, nope+R]
    v = torch.einsum("nbl,hvl->nbhv", c, w_uv)
    v = torch.nn.functional.pad(v, (0, nope + rope - v_dim))            # one head size for K, V
    q = torch.cat([q_nope, q_pe], dim=-1)
    ref = ops_native.paged_attention(q, k, v, batch["query_start_loc"], batch["seq_lens"],
                                     batch["block_table"], batch["scale"])[..., :v_dim]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_and_cache_mla(dtype):
    lora, rope, bs, num_blocks, T = 40, 8, 16, 6, 20
    g = torch.Generator().manual_seed(2)
    kv_c = torch.randn(T, lora, generator=g).to(dtype)
    k_pe = torch.randn(T, rope, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:T].long()
    slots[[3, 11]] = -1                                                 # padding rows
    caches = []
    for impl in (ops, ops_native):
        cache = torch.zeros(num_blocks, bs, lora + rope, dtype=dtype)
        impl.concat_and_cache_mla(kv_c, k_pe, cache, slots)
        caches.append(cache)
    torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)
    flat = caches[0].view(-1, lora + rope)
    keep = slots >= 0
    torch.testing.assert_close(flat[slots[keep]], torch.cat([kv_c, k_pe], -1)[keep], atol=0, rtol=0)
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[keep]] = True
    assert (flat[~written] == 0).all()


def test_bad_shapes_are_value_errors():
    batch = latent_batch([(2, 5)], 2, 16, 8, 16)
    with pytest.raises(ValueError, match="L\\+R"):
        ops.mla_paged_attention(**{**batch, "kv_cache": batch["kv_cache"][..., :-1]})
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ops.mla_paged_attention(**{**batch, "kv_lora_rank": 30})



def test_registered_op_opcheck():
    batch = latent_batch([(1, 9), (3, 3)], 4, 24, 8, 16, seed=4)
    batch["kv_cache"] = batch["kv_cache"].nan_to_num()
    out = torch.empty(batch["q"].shape[0], 4, 24)
    args = (out, batch["q"], batch["kv_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_table"], batch["scale"], 24)
    torch.library.opcheck(torch.ops.octavo.mla_paged_attention.default, args)
