"""Hugging Face parity of Gemma 2/3, SmolLM3, Ernie 4.5, GLM-4, Granite, OLMo 2 and Cohere.

Each tiny random config makes its architecture's distinguishing features bite: sliding windows
shorter than the prompts, several layers so that alternating patterns show, soft-caps and
multipliers large enough to change the logits. `test_feature_changes_transformers_output` proves
that for each such feature: switching it off in transformers changes the logits, so the parity
test could not pass with octavo ignoring it. Norm weights are randomised after saving (random
init leaves them at 1, which would hide a norm loaded wrongly). Two tensor-parallel ranks must
give one rank's logits; the norms that span all heads (OLMo 2, Cohere's q/k norm) refuse TP.
"""
from __future__ import annotations

import pytest

from parity import (assert_refuses_tensor_parallelism, assert_two_ranks_match_one, parity_tests,
                    tiny_model_dirs)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08)
SLIDING_4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# case -> (architecture, model_type, config fields)
CASES = {
    "gemma2": ("Gemma2ForCausalLM", "gemma2", dict(
        query_pre_attn_scalar=24, sliding_window=8, layer_types=SLIDING_4,
        attn_logit_softcapping=4.0, final_logit_softcapping=3.0, initializer_range=0.2,
        tie_word_embeddings=True)),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", dict(
        query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=3.0, initializer_range=0.2)),
    "smollm3": ("SmolLM3ForCausalLM", "smollm3", dict(
        no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8)),
    "ernie4_5": ("Ernie4_5ForCausalLM", "ernie4_5", dict(use_bias=True)),
    "glm4": ("Glm4ForCausalLM", "glm4", dict(partial_rotary_factor=0.5, attention_bias=True)),
    "granite": ("GraniteForCausalLM", "granite", dict(
        embedding_multiplier=4.0, attention_multiplier=0.5, residual_multiplier=0.5,
        logits_scaling=2.0)),
    "olmo2": ("Olmo2ForCausalLM", "olmo2", dict()),
    "cohere": ("CohereForCausalLM", "cohere", dict(logit_scale=0.5, tie_word_embeddings=True)),
    "cohere-qk-norm": ("CohereForCausalLM", "cohere", dict(logit_scale=0.5, use_qk_norm=True)),
}
ARCHITECTURES = sorted({arch for arch, _, _ in CASES.values()})

# case -> config changes, each of which switches off one feature the parity test relies on
FEATURES = {
    "gemma2": [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
               dict(sliding_window=4096)],
    "gemma3": [dict(sliding_window=4096), dict(final_logit_softcapping=None),
               dict(rope_parameters={"sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default",
                                                        "rope_theta": 10000.0}})],
    "smollm3": [dict(no_rope_layers=[1, 1, 1, 1]), dict(sliding_window=4096)],
    "granite": [dict(embedding_multiplier=1.0), dict(attention_multiplier=0.25),
                dict(residual_multiplier=1.0), dict(logits_scaling=1.0)],
    "cohere": [dict(logit_scale=1.0)],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return tiny_model_dirs(tmp_path_factory, CASES, COMMON)


test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output = \
    parity_tests(CASES, FEATURES)


# Heads split across ranks under soft-cap and sandwich norms, per-head q/k norm, GPT-J partial
# rotary with GLM-4's fused gate_up_proj split per rank, Cohere's parallel block
TP_CASES = ["gemma2", "gemma3", "glm4", "cohere"]


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    assert_two_ranks_match_one({case: model_dirs(case) for case in TP_CASES}, tmp_path)


@pytest.mark.parametrize("case", ["olmo2", "cohere-qk-norm"])
def test_norms_across_heads_refuse_tensor_parallelism(case, model_dirs):
    assert_refuses_tensor_parallelism(model_dirs(case))
