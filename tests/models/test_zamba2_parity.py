"""Zamba2 vs transformers (fp32): greedy ids and top-5 logprobs of a batch of prompts of
different lengths, whole and with chunked prefill, under forced recompute preemption; shared
blocks tied (two blocks over three uses, adapters, rotary) and untied; each use its own KV
cache; dt's lower clamp (time_step_min); prefix caching refused."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from parity import PROMPTS, assert_matches_hf, hf_greedy, longest_prompt_ids
from test_mamba_parity import _force_preemptions
from tiny_models import save_tiny_model
from octavo import LLM, SamplingParams

ARCHITECTURES = ["Zamba2ForCausalLM"]
# layers: mamba, hybrid (block 0), mamba, hybrid (block 1), hybrid (block 0 again), mamba
ZAMBA2 = dict(hidden_size=64, num_hidden_layers=6,
              layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8,
              chunk_size=8, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
              num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8,
              use_mem_rope=True, max_position_embeddings=512, initializer_range=0.08,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=True)


def build_zamba2(path: str, **overrides) -> str:
    return save_tiny_model(path, "zamba2", "Zamba2ForCausalLM", **{**ZAMBA2, **overrides})


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_zamba2(str(tmp_path_factory.mktemp("zamba2_tied")))


def test_shared_blocks_are_tied_and_uses_keep_their_own_cache(tied_dir):
    """transformers ties layer 4's block to layer 1's (so parity below covers the tie); octavo
    holds two blocks and three Attention layers, one per use."""
    hf = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32)
    q = [hf.model.layers[i].shared_transformer.self_attn.q_proj.weight for i in (1, 3, 4)]
    assert q[0].data_ptr() == q[2].data_ptr() != q[1].data_ptr()
    runner = LLM(tied_dir, dtype="float32", kv_cache_memory=1 << 24).llm_engine.runner
    assert len(runner.model.model.shared_blocks) == 2
    assert len(runner.attn_layers) == 3 and len(runner.state_layers) == 6


def test_greedy_and_logprobs_match_transformers(tied_dir):
    assert_matches_hf(tied_dir)


def test_chunked_prefill_matches_transformers(tied_dir):
    budget = 16
    assert len(longest_prompt_ids()) > 2 * budget      # the long prompts take several chunks
    assert_matches_hf(tied_dir, max_tokens=8, max_num_batched_tokens=budget, max_num_seqs=4)


def test_untied_blocks_match_transformers(tmp_path):
    """Without tie_word_embeddings transformers keeps a block per use (no adapters, no rotary
    here, GQA): octavo loads each use's own weights."""
    path = build_zamba2(str(tmp_path / "untied"), tie_word_embeddings=False,
                        use_shared_attention_adapter=False, use_mem_rope=False,
                        num_key_value_heads=2, seed=1)
    assert_matches_hf(path, prompts=PROMPTS[:5], max_tokens=8)


def test_preemption_recomputes_state(tied_dir):
    llm = LLM(tied_dir, dtype="float32", kv_cache_memory=1 << 24, max_num_batched_tokens=16,
              max_num_seqs=4)
    victims = _force_preemptions(llm, every=2, limit=4)
    params = SamplingParams(temperature=0, max_tokens=8)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions == len(victims) > 0
    assert llm.llm_engine.kv.slots.num_free == llm.llm_engine.kv.slots.num_slots
    reference = hf_greedy(tied_dir, [o.prompt_token_ids for o in outputs], 8)
    for out, (tokens, _) in zip(outputs, reference):
        assert out.outputs[0].token_ids == tokens


def test_dt_lower_clamp_matches_transformers_prefill(tmp_path):
    """transformers clamps softplus(dt + dt_bias) at time_step_min on its prefill path; with a
    clamp that binds, octavo's prompt logprobs equal transformers' full-sequence logits (and
    differ from those without the clamp, so the clamp is exercised)."""
    path = build_zamba2(str(tmp_path / "clamp"), time_step_min=0.5, time_step_max=1.0,
                        time_step_floor=1e-4, initializer_range=0.12)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = longest_prompt_ids()
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for layer in hf.model.layers:
            mixer = getattr(layer, "mamba", None) or layer.mamba_decoder.mamba
            mixer.time_step_limit = (0.0, math.inf)
        unclamped = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    targets = (torch.arange(len(ids) - 1), torch.tensor(ids[1:]))
    assert (want - unclamped)[targets].abs().max().item() > 1e-2
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24)
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token = ids[pos]
        assert entry[token].logprob == pytest.approx(want[pos - 1, token].item(), abs=2e-4)


def test_prefix_caching_is_refused(tied_dir):
    llm = LLM(tied_dir, dtype="float32", kv_cache_memory=1 << 24, enable_prefix_caching=True)
    assert not llm.llm_engine.kv.enable_prefix_caching
    params = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert not again.num_cached_tokens
