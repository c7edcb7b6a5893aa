"""Hugging Face parity of MiniCPM3 (multi-head latent attention; transformers has the class).

Tiny configs with q_lora (and without), a value head smaller than the q/k head (the latent
cache of models/layers/mla.py holds neither head: W_UV comes after attention), muP scales that
change the logits, and LongRoPE whose original context is shorter than the longer prompts, so
both the short and the long table are used (and a sequence grows past it while decoding). `test_feature_changes_transformers_output` shows those features bite.
"""
from __future__ import annotations

import math

import pytest
import torch

from parity import assert_two_ranks_match_one, parity_tests, tiny_model_dirs

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
    cases = {case: ("MiniCPM3ForCausalLM", "minicpm3", fields) for case, fields in CASES.items()}
    return tiny_model_dirs(tmp_path_factory, cases, COMMON)


test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output = \
    parity_tests(CASES, FEATURES)


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    """Heads split across ranks: q_b_proj / q_proj and kv_b_proj by column, o_proj by row, the
    latent projections replicated."""
    assert_two_ranks_match_one({case: model_dirs(case) for case in CASES}, tmp_path)
