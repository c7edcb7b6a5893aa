"""Hugging Face parity of LongCat-Flash (LongcatFlashForCausalLM): two MLA sublayers and two dense
MLPs per decoder layer, a shortcut MoE with zero-computation (identity) experts.

Tiny configs: 6 routed + 2 zero experts, top-3 (so that tokens pick zero experts and routed ones
together), a random score-correction bias over all 8, routed_scaling_factor; a case without zero
experts and with yarn. `test_feature_changes_transformers_output` shows that transformers'
output depends on the zero experts, the bias, the scaling and the shortcut MoE;
`test_zero_experts_are_chosen` that octavo's router really picks them.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from octavo.models.layers.cache_spec import PagedLatentSpec
from octavo.models.layers.mla import MLAAttention
from octavo.models.longcat_flash import ZeroExpertFusedMoE

from tiny_models import save_tiny_model
from parity import assert_changes_logits, assert_matches_hf, hf_logits, logits, longest_prompt_ids

MLA = dict(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8,
           v_head_dim=12)
COMMON = dict(hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False, initializer_range=0.08, n_routed_experts=6,
              moe_topk=3, expert_ffn_hidden_size=48, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MLA)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
        "mscale_all_dim": 0.8, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1}
CASES = {
    "longcat": dict(zero_expert_num=2, routed_scaling_factor=2.0),
    "longcat-no-zero-yarn": dict(zero_expert_num=0, routed_scaling_factor=1.5,
                                 rope_parameters=YARN),
}
ARCHITECTURES = ["LongcatFlashForCausalLM"]   # read by test_registry.py


def _randomise_norms_and_bias(path: str, seed: int) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "norm" in name:
            tensors[name] = t + 0.2 * torch.randn(t.shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.05 * torch.randn(t.shape, generator=gen)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(case: str) -> str:
        if case not in cache:
            path = str(tmp_path_factory.mktemp(case))
            save_tiny_model(path, "longcat_flash", "LongcatFlashForCausalLM",
                            **{**COMMON, **CASES[case]})
            _randomise_norms_and_bias(path, seed=1)
            cache[case] = path
        return cache[case]

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, model_dirs):
    assert_matches_hf(model_dirs(case), block_size=16)


def _zeroed(path: str, part: str, ids: list[int], value: float = 0.0) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        hit = [p.fill_(value) for n, p in tensors if part in n]
        assert hit, f"no {part!r} in the model"
    return logits(model, ids)


def test_feature_changes_transformers_output(model_dirs):
    path, ids = model_dirs("longcat"), longest_prompt_ids()
    base = hf_logits(path, ids)
    assert_changes_logits(base, hf_logits(path, ids, routed_scaling_factor=1.0),
                          "routed_scaling_factor")
    assert_changes_logits(base, _zeroed(path, "e_score_correction_bias", ids),
                          "the score-correction bias")
    assert_changes_logits(base, _zeroed(path, "mlp.experts.down_proj", ids),
                          "the shortcut MoE's routed experts")
    # zero experts never chosen: their identity terms are gone
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias[6:] = -10.0
    assert_changes_logits(base, logits(model, ids), "the zero experts")


def test_zero_experts_are_chosen(model_dirs, monkeypatch):
    """octavo's router picks zero experts for some tokens and routed ones for all but few, so
    both halves of the split run."""
    from tp_util import one_rank_logits

    seen = []
    split = ZeroExpertFusedMoE._split

    def spy(self, weights, ids):
        seen.append(ids.clone())
        return split(self, weights, ids)

    monkeypatch.setattr(ZeroExpertFusedMoE, "_split", spy)
    one_rank_logits(model_dirs("longcat"), [longest_prompt_ids()])
    ids = torch.cat(seen)
    assert (ids >= 6).any() and (ids < 6).any()
    assert len(set(ids[ids < 6].tolist())) >= 4


def test_split_sends_zero_pairs_to_a_chosen_expert():
    moe = ZeroExpertFusedMoE(4, 2, 3, 8, 16)
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.4, 0.4, 0.2]])
    ids = torch.tensor([[4, 2, 1], [5, 4, 5], [0, 3, 2]], dtype=torch.int32)
    w, e, identity = moe._split(weights, ids)
    assert e.tolist() == [[1, 2, 1], [0, 0, 0], [0, 3, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.3, 0.2], [0.0, 0.0, 0.0], [0.4, 0.4, 0.2]]))
    torch.testing.assert_close(identity, torch.tensor([[0.5], [1.0], [0.0]]))


def test_stacked_expert_layout_loads_like_per_expert(model_dirs, tmp_path):
    """transformers 5's own layout: experts.gate_up_proj [E + Z, 2I, H] (rows for the zero
    experts too) and experts.down_proj [E, H, I]."""
    from tp_util import one_rank_logits

    per_expert = model_dirs("longcat")
    model = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    stacked = str(tmp_path / "stacked")
    model.save_pretrained(stacked, save_original_format=False)
    tensors = load_file(os.path.join(stacked, "model.safetensors"))
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8
    seqs = [list(range(3, 16)), list(range(40, 61))]
    torch.testing.assert_close(one_rank_logits(stacked, seqs), one_rank_logits(per_expert, seqs),
                               atol=0, rtol=0)


def test_two_latent_cache_layers_per_decoder_layer(model_dirs):
    from octavo import LLM

    llm = LLM(model=model_dirs("longcat"), dtype="float32", kv_cache_memory=1 << 22)
    layers = llm.llm_engine.runner.cache_layers
    assert len(layers) == 2 * COMMON["num_layers"]
    assert all(isinstance(m, MLAAttention) for m in layers)
    assert {m.cache_spec() for m in layers} == {PagedLatentSpec(24 + 8)}


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    """MLA heads and the routed experts' intermediate size split over two ranks; the zero
    experts' identity terms are added once, after the experts' all-reduce."""
    from tp_util import one_rank_logits, two_rank_logits

    seqs = [list(range(3, 16)), list(range(40, 61))]
    path = model_dirs("longcat")
    (got,) = two_rank_logits([path], seqs, str(tmp_path))
    torch.testing.assert_close(got, one_rank_logits(path, seqs), atol=1e-4, rtol=0)
