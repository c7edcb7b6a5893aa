"""Hugging Face parity of MiniCPM3 (multi-head latent attention; transformers has the class).

Tiny configs with q_lora (and without), a value head smaller than the q/k head (the latent
cache of models/layers/mla.py holds neither head: W_UV comes after attention), muP scales that
change the logits, and LongRoPE whose original context is shorter than the longer prompts, so
both the short and the long table are used (and a sequence grows past it while decoding). `test_feature_changes_transformers_output` shows those features bite.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import save_tiny_model
from parity import assert_changes_logits, assert_matches_hf, hf_logits, longest_prompt_ids

ROPE_DIM = 8
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
              qk_rope_head_dim=ROPE_DIM, v_head_dim=12, max_position_embeddings=512,
              scale_emb=4.0, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.08,
              rms_norm_eps=1e-5)
_gen = torch.Generator().manual_seed(5)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 24,
            "short_factor": (1 + torch.rand(ROPE_DIM // 2, generator=_gen)).tolist(),
            "long_factor": (1 + 4 * torch.rand(ROPE_DIM // 2, generator=_gen)).tolist()}

CASES = {
    "minicpm3": dict(),
    "minicpm3-no-q-lora": dict(q_lora_rank=None, v_head_dim=20, tie_word_embeddings=False),
    "minicpm3-longrope": dict(rope_parameters=LONGROPE),
}
ARCHITECTURES = ["MiniCPM3ForCausalLM"]

FEATURES = {
    "minicpm3": [dict(scale_emb=1.0), dict(scale_depth=math.sqrt(3)), dict(dim_model_base=64)],
    "minicpm3-longrope": [dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(case: str) -> str:
        if case not in cache:
            path = str(tmp_path_factory.mktemp(case))
            save_tiny_model(path, "minicpm3", "MiniCPM3ForCausalLM", **{**COMMON, **CASES[case]})
            file = os.path.join(path, "model.safetensors")
            tensors = load_file(file)  # norms start at 1: randomise them so a misplaced one shows
            gen = torch.Generator().manual_seed(1)
            for name, t in tensors.items():
                if "norm" in name:
                    tensors[name] = t + 0.2 * torch.randn(t.shape, generator=gen)
            save_file(tensors, file, metadata={"format": "pt"})
            cache[case] = path
        return cache[case]

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, model_dirs):
    assert_matches_hf(model_dirs(case), block_size=16)


@pytest.mark.parametrize("case, changes", [(c, ch) for c, chs in FEATURES.items() for ch in chs],
                         ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_feature_changes_transformers_output(case, changes, model_dirs):
    ids = longest_prompt_ids()
    assert_changes_logits(hf_logits(model_dirs(case), ids),
                          hf_logits(model_dirs(case), ids, **changes), f"{case}: {changes}")


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    """Heads split across ranks: q_b_proj / q_proj and kv_b_proj by column, o_proj by row, the
    latent projections replicated."""
    from tp_util import one_rank_logits, two_rank_logits

    seqs = [list(range(3, 16)), list(range(40, 61))]   # the second is past LongRoPE's 24
    cases = ["minicpm3", "minicpm3-no-q-lora", "minicpm3-longrope"]
    dirs = [model_dirs(case) for case in cases]
    for case, path, got in zip(cases, dirs, two_rank_logits(dirs, seqs, str(tmp_path))):
        torch.testing.assert_close(got, one_rank_logits(path, seqs), atol=1e-4, rtol=0,
                                   msg=lambda m, case=case: f"{case}: {m}")
