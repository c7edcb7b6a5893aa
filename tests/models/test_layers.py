"""Shared layers against plain PyTorch / transformers: sharded linear loaders, rotary scaling
types vs transformers' ROPE_INIT_FUNCTIONS, norms, activations, embeddings, paged Attention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from octavo.models.layers import parallel_state
from octavo.models.layers.activation import GeluAndMul, SiluAndMul, get_gated_activation
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.custom_op import native_ops
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import LayerNorm, RMSNorm
from octavo.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                         QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
from octavo.models.layers.rotary import get_rope, rope_parameters

NATIVE = pytest.mark.parametrize("native", [False, True], ids=["ops", "native"])


@pytest.fixture
def tp():
    """Build layers as rank r of n (no process group: tests combine shards by hand)."""
    def set_rank(rank, size):
        parallel_state.set_tensor_parallel(rank, size)
    yield set_rank
    parallel_state.set_tensor_parallel(0, 1)


# ----------------------------------------------------------------------------- linear

def test_replicated_and_column_linear_forward():
    torch.manual_seed(0)
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    for cls in (ReplicatedLinear, ColumnParallelLinear):
        layer = cls(8, 12, bias=True)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        torch.testing.assert_close(layer(x), F.linear(x, w, b))


def test_merged_column_loads_each_projection_and_fused_tensor():
    torch.manual_seed(0)
    gate, up, x = torch.randn(6, 8), torch.randn(10, 8), torch.randn(3, 8)
    layer = MergedColumnParallelLinear(8, [6, 10])
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))
    fused = MergedColumnParallelLinear(8, [6, 10])
    fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))
    torch.testing.assert_close(fused.weight, layer.weight)


def test_qkv_loader_places_q_k_v():
    torch.manual_seed(0)
    q, k, v = torch.randn(4 * 3, 16), torch.randn(2 * 3, 16), torch.randn(2 * 3, 16)
    bq, bk, bv = torch.randn(12), torch.randn(6), torch.randn(6)
    layer = QKVParallelLinear(16, 3, 4, 2, bias=True)
    for sid, w, b in (("q", q, bq), ("k", k, bk), ("v", v, bv)):
        layer.weight.weight_loader(layer.weight, w, sid)
        layer.bias.weight_loader(layer.bias, b, sid)
    torch.testing.assert_close(layer.weight, torch.cat([q, k, v]))
    torch.testing.assert_close(layer.bias, torch.cat([bq, bk, bv]))
    with pytest.raises(ValueError, match="shard_id"):
        layer.weight.weight_loader(layer.weight, q, "x")
    with pytest.raises(ValueError, match="should have size"):
        layer.weight.weight_loader(layer.weight, torch.randn(5, 16), "k")


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_qkv_tensor_parallel_shards(tp, num_kv_heads):
    """Rank r gets q heads r*2:(r+1)*2; kv heads are split, or replicated when too few."""
    torch.manual_seed(0)
    hd, hidden, heads, size = 3, 8, 4, 2
    q, k, v = (torch.randn(n * hd, hidden) for n in (heads, num_kv_heads, num_kv_heads))
    kv_per = max(num_kv_heads // size, 1)
    for rank in range(size):
        tp(rank, size)
        layer = QKVParallelLinear(hidden, hd, heads, num_kv_heads)
        for sid, w in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, w, sid)
        kv_rank = rank if num_kv_heads >= size else rank // (size // num_kv_heads)
        kv = slice(kv_rank * kv_per * hd, (kv_rank + 1) * kv_per * hd)
        want = torch.cat([q[rank * 2 * hd:(rank + 1) * 2 * hd], k[kv], v[kv]])
        torch.testing.assert_close(layer.weight, want)


def test_column_and_row_parallel_shards_compose(tp):
    """Column-parallel up then row-parallel down over 2 ranks sums to the unsharded result."""
    torch.manual_seed(0)
    gate, up, down = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)
    bias, x = torch.randn(8), torch.randn(3, 8)
    want = F.linear(F.silu(x @ gate.T) * (x @ up.T), down, bias)
    total = torch.zeros(3, 8)
    for rank in range(2):
        tp(rank, 2)
        gu = MergedColumnParallelLinear(8, [6, 6])
        gu.weight.weight_loader(gu.weight, gate, 0)
        gu.weight.weight_loader(gu.weight, up, 1)
        row = RowParallelLinear(6, 8, bias=True)
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, bias)
        assert row.weight.shape == (8, 3)
        h = SiluAndMul().forward_native(gu(x))
        total += row.quant_method.apply(row, h, row.bias if rank == 0 else None)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)


def test_uneven_tensor_parallel_split_names_the_problem(tp):
    tp(0, 3)
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(8, 10)


# ----------------------------------------------------------------------------- rotary

def _hf_config(head_dim=16, heads=4, max_pos=64, rope=None, theta=10000.0):
    rope = {"rope_type": "default", "rope_theta": theta, **(rope or {})}
    return transformers.LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads,
                                    head_dim=head_dim, max_position_embeddings=max_pos,
                                    rope_parameters=rope)


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 32, "truncate": False},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rope_scaling_matches_transformers(name):
    scaling = SCALINGS[name]
    config = _hf_config(rope=scaling, max_pos=128)
    base, parsed = rope_parameters(config)
    rope = get_rope(16, 16, config.max_position_embeddings, base, True, parsed)
    seq_len = None
    if scaling["rope_type"] == "dynamic":  # octavo fixes the base for the longest context
        seq_len = int(config.max_position_embeddings * scaling["factor"])
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len)
    positions = torch.arange(rope.cos_sin_cache.shape[0], dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())
    want = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor
    assert rope.cos_sin_cache.dtype == torch.float32
    assert rope.cos_sin_cache.shape[1] == 16
    torch.testing.assert_close(rope.cos_sin_cache, want, atol=2e-5, rtol=1e-5)


def test_rope_default_and_shared_instances():
    a = get_rope(16, 16, 64, 10000.0, True, None)
    assert a is get_rope(16, 16, 64, 10000.0, True, None)
    assert a is not get_rope(16, 16, 64, 10000.0, False, None)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    torch.testing.assert_close(a.cos_sin_cache, torch.cat([freqs.cos(), freqs.sin()], -1))
    with pytest.raises(ValueError, match="unsupported rope_type"):
        get_rope(16, 16, 64, 10000.0, True, {"rope_type": "nonsense", "factor": 2.0})


def test_rope_parameters_accepts_old_and_new_config_forms():
    class Old:
        rope_theta = 5e5
        rope_scaling = {"type": "linear", "factor": 2.0}
    assert rope_parameters(Old()) == (5e5, {"rope_type": "linear", "factor": 2.0})

    class Plain:
        rope_theta, rope_scaling = 1234.0, None
    assert rope_parameters(Plain()) == (1234.0, None)
    new = _hf_config(theta=777.0, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    base, scaling = rope_parameters(new)
    assert base == 777.0 and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert rope_parameters(_hf_config(theta=99.0)) == (99.0, None)


@NATIVE
def test_rope_neox_matches_transformers_apply(native):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    torch.manual_seed(0)
    rope = get_rope(16, 16, 64, 10000.0, True, None)
    positions = torch.tensor([0, 5, 17, 63, 2])
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    half = rope.cos_sin_cache[positions]
    cos = torch.cat([half[:, :8], half[:, :8]], -1)[None]
    sin = torch.cat([half[:, 8:], half[:, 8:]], -1)[None]
    want_q, want_k = apply_rotary_pos_emb(q.view(1, 5, 4, 16).transpose(1, 2),
                                          k.view(1, 5, 2, 16).transpose(1, 2), cos, sin)
    with native_ops(native):
        rope(positions, q, k)
    torch.testing.assert_close(q, want_q.transpose(1, 2).reshape(5, 64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k.transpose(1, 2).reshape(5, 32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_ops_path_matches_native_partial_rotary_on_qkv_views(neox):
    torch.manual_seed(0)
    rope = get_rope(16, 8, 32, 10000.0, neox, None)  # partial rotary: 8 of 16 dims
    positions = torch.randint(0, 32, (7,))
    qkv = torch.randn(7, (4 + 2 + 2) * 16)
    ref = qkv.clone()
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    rq, rk, _ = ref.split([64, 32, 32], dim=-1)
    rope.forward_ops(positions, q, k)
    rope.forward_native(positions, rq, rk)
    torch.testing.assert_close(qkv, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv.view(7, 8, 16)[:, :, 8:], ref.view(7, 8, 16)[:, :, 8:])


# ----------------------------------------------------------------------------- norms, activations

@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(native, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    x, r = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
    hf = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
        norm.weight.copy_(hf.weight)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with native_ops(native):
        torch.testing.assert_close(norm(x), hf(x), **tol)
        out, new_res = norm(x.clone(), r.clone())
    summed = (x.float() + r.float()).to(dtype)
    torch.testing.assert_close(new_res, summed)
    torch.testing.assert_close(out, hf(summed), **tol)


def test_layer_norm_matches_torch():
    torch.manual_seed(0)
    ln, ref = LayerNorm(24, eps=1e-5), torch.nn.LayerNorm(24, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
        ln.weight.copy_(ref.weight), ln.bias.copy_(ref.bias)
    x, r = torch.randn(3, 24), torch.randn(3, 24)
    torch.testing.assert_close(ln(x), ref(x))
    out, res = ln(x, r)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, ref(x + r))


@NATIVE
def test_gated_activations(native):
    torch.manual_seed(0)
    x = torch.randn(5, 2 * 24)
    gate, up = x[:, :24], x[:, 24:]
    with native_ops(native):
        torch.testing.assert_close(SiluAndMul()(x), F.silu(gate) * up)
        torch.testing.assert_close(GeluAndMul()(x), F.gelu(gate) * up)
        torch.testing.assert_close(GeluAndMul("tanh")(x), F.gelu(gate, approximate="tanh") * up)
        torch.testing.assert_close(get_gated_activation("gelu_pytorch_tanh")(x),
                                   F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="unsupported hidden_act"):
        get_gated_activation("relu6")


# ----------------------------------------------------------------------------- embeddings

def test_embedding_and_tied_lm_head():
    torch.manual_seed(0)
    w = torch.randn(50, 8)
    emb = VocabParallelEmbedding(50, 8)
    emb.weight.weight_loader(emb.weight, w)
    ids = torch.tensor([0, 49, 7])
    torch.testing.assert_close(emb(ids), w[ids])
    head = ParallelLMHead(50, 8)
    head.tie_to(emb)
    assert head.weight is emb.weight
    h = torch.randn(3, 8)
    logits = head.compute_logits(h)
    assert logits.dtype == torch.float32 and logits.shape == (3, 50)
    torch.testing.assert_close(logits, h @ w.T)


def test_vocab_parallel_shards_pad_the_last_rank(tp):
    w = torch.randn(11, 4)
    rows = []
    for rank in range(2):
        tp(rank, 2)
        emb = VocabParallelEmbedding(11, 4)
        emb.weight.weight_loader(emb.weight, w)
        assert emb.weight.shape == (6, 4)
        rows.append(emb.weight.data)
    torch.testing.assert_close(torch.cat(rows)[:11], w)
    assert torch.all(rows[1][5:] == 0)


# ----------------------------------------------------------------------------- attention

def _naive_attention(q, k, v, scale, window=0, soft_cap=0.0, slopes=None):
    # q [L, Hq, hd], k/v [L, Hk, hd]: causal self-attention over one whole sequence
    L, hq, _ = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # j - p
    if slopes is not None:
        logits = logits + slopes[:, None, None] * rel
    allowed = rel <= 0
    if window:
        allowed &= rel > -window
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@NATIVE
@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "alibi"])
def test_attention_layer_paged_prefill(native, variant):
    torch.manual_seed(0)
    hq, hk, hd, bs = 4, 2, 8, 4
    kwargs = {"window": dict(sliding_window=3), "softcap": dict(logit_soft_cap=2.0),
              "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))}.get(variant, {})
    attn = Attention(hq, hd, hd ** -0.5, hk, **kwargs)
    attn.k_cache, attn.v_cache = torch.zeros(10, bs, hk, hd), torch.zeros(10, bs, hk, hd)
    lens, tables = [6, 9], [[7, 2], [0, 9, 4]]
    slots = [tables[s][p // bs] * bs + p % bs for s, n in enumerate(lens) for p in range(n)]
    md = AttentionMetadata(slot_mapping=torch.tensor(slots + [-1]),  # one padding token
                           query_start_loc=torch.tensor([0, 6, 15], dtype=torch.int32),
                           seq_lens=torch.tensor(lens, dtype=torch.int32),
                           block_table=torch.tensor([[7, 2, 0], [0, 9, 4]], dtype=torch.int32),
                           max_query_len=9, max_seq_len=9)
    q, k, v = torch.randn(16, hq * hd), torch.randn(16, hk * hd), torch.randn(16, hk * hd)
    with native_ops(native):
        out = attn(q, k, v, md)
    assert out.shape == (16, hq * hd)
    for s, (a, b) in enumerate([(0, 6), (6, 15)]):
        want = _naive_attention(q[a:b].view(-1, hq, hd), k[a:b].view(-1, hk, hd),
                                v[a:b].view(-1, hk, hd), hd ** -0.5,
                                kwargs.get("sliding_window", 0), kwargs.get("logit_soft_cap", 0.0),
                                kwargs.get("alibi_slopes"))
        torch.testing.assert_close(out[a:b], want.reshape(b - a, -1), atol=1e-5, rtol=1e-5)
    assert math.isclose(attn.scale, hd ** -0.5)
