"""Parity of Snowflake Arctic (ArcticForCausalLM), remote code with no transformers class.

Arctic's tensor names are Mixtral's (block_sparse_moe.gate, block_sparse_moe.experts.<e>.w1/w3/w2)
plus block_sparse_moe.mlp.w1/w3/w2 on the dense layers (those off the moe_layer_frequency grid)
and, with parallel_attn_mlp_res, residual_layernorm and residual_mlp.w1/w3/w2 (hidden_size wide)
on the sparse ones. The reference is transformers' Mixtral loaded from the tiny checkpoint with
those parts put in from outside, as Arctic's modeling file defines them: dense layers get a
plain gated MLP in place of the sparse block, and a sparse layer with the residual MLP runs
    y = x + attn(input_layernorm(x))
    out = y + residual_mlp(residual_layernorm(y)) + moe(post_attention_layernorm(x))
(the MoE reads the layer input, in parallel with attention; vLLM's Arctic does the same).
Mixtral's router renormalises its top-k, as Arctic's does for top_k > 1.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import save_tiny_model
from parity import assert_changes_logits, assert_matches_hf, logits, longest_prompt_ids
from test_parity_remote import _randomise_norms
from test_parity_remote_iquest import _write_remote

ARCHITECTURES = ["ArcticForCausalLM"]
HIDDEN, INTER, LAYERS = 64, 96, 4
MIXTRAL = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               initializer_range=0.08, rms_norm_eps=1e-5, sliding_window=None,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
CASES = {
    # dense layers 0 and 2; sparse layers 1 and 3 with the parallel residual MLP
    "arctic": dict(num_local_experts=6, num_experts_per_tok=2, moe_layer_frequency=2,
                   parallel_attn_mlp_res=True),
    # the published shape: every layer sparse with the residual MLP; top-3
    "arctic-every-layer": dict(num_local_experts=6, num_experts_per_tok=3, moe_layer_frequency=1,
                               parallel_attn_mlp_res=True),
    # plain sequential layers (no residual MLP), dense every third
    "arctic-sequential": dict(num_local_experts=5, num_experts_per_tok=2, moe_layer_frequency=3,
                              parallel_attn_mlp_res=False),
}


class _GatedMLP(nn.Module):
    def __init__(self, tensors: dict, prefix: str):
        super().__init__()
        for name in ("w1", "w2", "w3"):
            w = tensors[f"{prefix}.{name}.weight"]
            setattr(self, name, nn.Linear(w.shape[1], w.shape[0], bias=False))
            getattr(self, name).weight.data.copy_(w)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


def _parallel_forward(self, hidden_states, residual_mlp=True, moe_reads_input=True, **kwargs):
    """Arctic's sparse layer with the residual MLP; the switches take a part out (features)."""
    x = hidden_states
    attn, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
    y = x + attn
    out = y + self.mlp(self.post_attention_layernorm(x if moe_reads_input else y))
    return out + self.residual_mlp(self.residual_layernorm(y)) if residual_mlp else out


def arctic_reference(ref_dir: str, tensors: dict, fields: dict):
    """transformers' Mixtral with Arctic's dense layers and parallel residual MLPs."""
    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    freq = fields["moe_layer_frequency"]
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        if (i + 1) % freq:
            layer.mlp = _GatedMLP(tensors, f"{prefix}.block_sparse_moe.mlp")
        elif fields["parallel_attn_mlp_res"]:
            layer.residual_layernorm = type(layer.input_layernorm)(HIDDEN, eps=1e-5)
            layer.residual_layernorm.weight.data.copy_(tensors[f"{prefix}.residual_layernorm.weight"])
            layer.residual_mlp = _GatedMLP(tensors, f"{prefix}.residual_mlp")
            layer.forward = types.MethodType(_parallel_forward, layer)
    return model.eval()


def _arctic_tensors(tensors: dict, fields: dict, seed: int) -> dict:
    """The Mixtral checkpoint's tensors in Arctic's layout, with random dense and residual MLPs."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.08 * torch.randn(*shape, generator=gen)  # noqa: E731
    out = dict(tensors)
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        if (i + 1) % fields["moe_layer_frequency"]:
            for name in [n for n in out if n.startswith(f"{prefix}.block_sparse_moe.")]:
                del out[name]
            mlp = f"{prefix}.block_sparse_moe.mlp"
            out.update({f"{mlp}.w1.weight": rand(INTER, HIDDEN), f"{mlp}.w3.weight": rand(INTER, HIDDEN),
                        f"{mlp}.w2.weight": rand(HIDDEN, INTER)})
        elif fields["parallel_attn_mlp_res"]:
            res = f"{prefix}.residual_mlp"
            out.update({f"{res}.w1.weight": rand(HIDDEN, HIDDEN), f"{res}.w3.weight": rand(HIDDEN, HIDDEN),
                        f"{res}.w2.weight": rand(HIDDEN, HIDDEN),
                        f"{prefix}.residual_layernorm.weight": 1 + 0.2 * torch.randn(HIDDEN, generator=gen)})
    return out


def build_arctic(name: str, root: str):
    fields = CASES[name]
    ref_dir = os.path.join(root, "reference")
    save_tiny_model(ref_dir, "mixtral", "MixtralForCausalLM", **MIXTRAL,
                    num_local_experts=fields["num_local_experts"],
                    num_experts_per_tok=fields["num_experts_per_tok"])
    file = os.path.join(ref_dir, "model.safetensors")
    tensors = load_file(file)
    assert any(".block_sparse_moe.experts.0.w1." in n for n in tensors), sorted(tensors)[:12]
    _randomise_norms(tensors, seed=1)
    save_file(tensors, file, metadata={"format": "pt"})
    tensors = _arctic_tensors(tensors, fields, seed=3)
    config = {k: v for k, v in MIXTRAL.items() if k != "rope_parameters"}
    config.update(fields, vocab_size=AutoConfig.from_pretrained(ref_dir).vocab_size,
                  rope_theta=10000.0, hidden_act="silu", architectures=["ArcticForCausalLM"],
                  model_type="arctic", auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})
    remote = os.path.join(root, name)
    _write_remote(remote, ref_dir, tensors, config)
    return remote, arctic_reference(ref_dir, tensors, fields)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def make(name: str):
        if name not in cache:
            cache[name] = build_arctic(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(CASES))
def test_arctic_matches_reference(name, dirs):
    remote, reference = dirs(name)
    assert_matches_hf(remote, reference=reference, trust_remote_code=True)


@pytest.mark.parametrize("switch", [dict(residual_mlp=False), dict(moe_reads_input=False)],
                         ids=["residual_mlp", "moe_reads_input"])
def test_features_change_reference_output(switch, dirs):
    """The residual MLP and the MoE's parallel input both bite: the reference without the
    residual MLP, or with the MoE reading the post-attention state, gives other logits."""
    _, reference = dirs("arctic-every-layer")
    ids = longest_prompt_ids()
    base = logits(reference, ids)
    layers = reference.model.layers
    try:
        for layer in layers:
            layer.forward = types.MethodType(
                lambda self, h, **kw: _parallel_forward(self, h, **switch, **kw), layer)
        assert_changes_logits(base, logits(reference, ids), f"{switch}")
    finally:
        for layer in layers:
            layer.forward = types.MethodType(_parallel_forward, layer)


def test_tensor_parallel_two_ranks_match_one(dirs, tmp_path):
    """Experts, dense and residual MLPs split over two ranks."""
    from tp_util import one_rank_logits, two_rank_logits

    seqs = [list(range(3, 16)), list(range(40, 61))]
    paths = [dirs(name)[0] for name in ("arctic", "arctic-sequential")]
    for path, got in zip(paths, two_rank_logits(paths, seqs, str(tmp_path))):
        torch.testing.assert_close(got, one_rank_logits(path, seqs), atol=1e-4, rtol=0)
