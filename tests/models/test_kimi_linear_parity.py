"""Kimi-Linear vs transformers (fp32, its torch KDA paths: chunked on prompts, recurrent on
decode): greedy ids and top-5 logprobs of a batch of prompts of different lengths, whole and
with chunked prefill, under forced recompute preemption, through the reference ops, with a plain
and a low-rank q in the MLA layers; KDA layers hold state slots and MLA layers the paged latent
cache; prefix caching refused."""
from __future__ import annotations

import pytest

from parity import PROMPTS, assert_matches_hf, hf_greedy, longest_prompt_ids
from test_mamba_parity import _force_preemptions
from tiny_models import save_tiny_model
from tokenizer_util import make_llama_tokenizer
from octavo import LLM, SamplingParams
from octavo.models.kimi_linear import KimiDeltaAttention, KimiMLA
from octavo.models.layers.custom_op import native_ops

ARCHITECTURES = ["KimiLinearForCausalLM"]

# layers: KDA + dense MLP, MLA + MoE, KDA + MoE, KDA + MoE; experts in 2 groups (top-1 group)
KIMI = dict(hidden_size=64, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "linear_attention"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"], intermediate_size=96,
            moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, linear_num_heads=4, linear_head_dim=16, linear_conv_kernel_dim=4,
            num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            max_position_embeddings=512, initializer_range=0.08, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_kimi(path: str, **overrides) -> str:
    return save_tiny_model(path, "kimi_linear", "KimiLinearForCausalLM", **{**KIMI, **overrides})


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    return build_kimi(str(tmp_path_factory.mktemp("kimi_linear")))


def test_greedy_and_logprobs_match_transformers(kimi_dir):
    assert_matches_hf(kimi_dir)
    runner = LLM(kimi_dir, dtype="float32", kv_cache_memory=1 << 24).llm_engine.runner
    assert sum(isinstance(m, KimiDeltaAttention) for m in runner.state_layers) == 3
    assert sum(isinstance(m, KimiMLA) for m in runner.model.modules()) == 1
    assert len(runner.paged_layers) == 1


def test_chunked_prefill_matches_transformers(kimi_dir):
    budget = 16
    assert len(longest_prompt_ids()) > 2 * budget      # the long prompts take several chunks
    assert_matches_hf(kimi_dir, max_tokens=8, max_num_batched_tokens=budget, max_num_seqs=4)


def test_long_prompt_matches_transformers(kimi_dir):
    """A prompt past transformers' 64-token KDA chunk and MLA's decompressed-prefill threshold,
    whole and in chunks of 48."""
    long_prompt = " ".join(PROMPTS[3:8]) * 2
    assert len(make_llama_tokenizer()(long_prompt).input_ids) > 2 * 128
    assert_matches_hf(kimi_dir, prompts=[long_prompt, PROMPTS[0]], max_tokens=6)
    assert_matches_hf(kimi_dir, prompts=[long_prompt, PROMPTS[0]], max_tokens=6,
                      max_num_batched_tokens=48)


def test_reference_path_matches_transformers(kimi_dir):
    """Every layer through its plain-PyTorch reference (what CUDA runs for KDA with key dims
    over 256), prompts chunked."""
    with native_ops():
        assert_matches_hf(kimi_dir, prompts=PROMPTS[:5], max_tokens=6, max_num_batched_tokens=16)


def test_low_rank_q_matches_transformers(tmp_path):
    """q_a_proj -> q_a_layernorm -> q_b_proj in the MLA layers, attention first (layer 0),
    every MLP sparse, one expert group."""
    path = build_kimi(str(tmp_path / "qlora"), q_lora_rank=24, n_group=1,
                      layer_types=["full_attention", "linear_attention", "linear_attention"],
                      mlp_layer_types=["sparse"] * 3, num_hidden_layers=3, seed=1)
    assert_matches_hf(path, prompts=PROMPTS[:5], max_tokens=8)


def test_preemption_recomputes_state(kimi_dir):
    llm = LLM(kimi_dir, dtype="float32", kv_cache_memory=1 << 24, max_num_batched_tokens=16,
              max_num_seqs=4)
    victims = _force_preemptions(llm, every=2, limit=4)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions == len(victims) > 0
    assert llm.llm_engine.kv.slots.num_free == llm.llm_engine.kv.slots.num_slots
    reference = hf_greedy(kimi_dir, [o.prompt_token_ids for o in outputs], 8)
    for out, (tokens, _) in zip(outputs, reference):
        assert out.outputs[0].token_ids == tokens


def test_prefix_caching_is_refused(kimi_dir):
    llm = LLM(kimi_dir, dtype="float32", kv_cache_memory=1 << 24, enable_prefix_caching=True)
    assert not llm.llm_engine.kv.enable_prefix_caching
    params = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert not again.num_cached_tokens
