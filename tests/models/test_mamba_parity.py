"""Mamba, Falcon-Mamba, Mamba-2 and Jamba vs transformers (fp32): greedy ids and top-5 logprobs
of a batch of prompts of different lengths, with chunked prefill, under forced recompute
preemption (and Jamba's own, when its KV blocks run out), and through beam search; both names of
the embedding tensor and a tied head load."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from parity import PROMPTS, assert_matches_hf, hf_greedy, longest_prompt_ids
from tiny_models import TINY_SSM_ARCHS, build_tiny_ssm_model, reference_beam_search
from octavo import LLM, SamplingParams
from octavo.beam_search import BeamSearchParams

ARCHITECTURES = list(TINY_SSM_ARCHS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: build_tiny_ssm_model(str(tmp_path_factory.mktemp(arch)), arch)
            for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_and_logprobs_match_transformers(arch, model_dirs):
    assert_matches_hf(model_dirs[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_matches_transformers(arch, model_dirs):
    budget = 16
    assert len(longest_prompt_ids()) > 2 * budget      # the long prompts take several chunks
    assert_matches_hf(model_dirs[arch], max_tokens=8, max_num_batched_tokens=budget,
                      max_num_seqs=4)


def _force_preemptions(llm: LLM, every: int, limit: int) -> list[tuple[int, int]]:
    """Before every `every`-th step, preempt (the scheduler's own recompute preemption) the
    most recently admitted running request not preempted yet, `limit` times in all; returns
    (computed tokens, prompt length) of each victim at that moment."""
    sched = llm.llm_engine.scheduler
    schedule, steps, victims = sched.schedule, itertools.count(1), []

    def schedule_with_preemption():
        fresh = [r for r in sched.running if r.num_preemptions == 0]
        if next(steps) % every == 0 and fresh and len(victims) < limit:
            victim = fresh[-1]
            victims.append((victim.num_computed_tokens, victim.num_prompt_tokens))
            sched.running.remove(victim)
            sched._preempt(victim)
        return schedule()

    sched.schedule = schedule_with_preemption
    return victims


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preemption_recomputes_state(arch, model_dirs):
    """A preempted request restarts from zero state in a new slot and still matches transformers,
    whether it was preempted in the middle of its prompt (chunked) or of its output."""
    path = model_dirs[arch]
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24, max_num_batched_tokens=16,
              max_num_seqs=4)
    victims = _force_preemptions(llm, every=2, limit=6)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions == len(victims) > 0
    assert any(0 < done < prompt for done, prompt in victims), "none preempted mid-prompt"
    assert any(done > prompt for done, prompt in victims), "none preempted mid-output"
    assert engine.kv.slots.num_free == engine.kv.slots.num_slots
    reference = hf_greedy(path, [o.prompt_token_ids for o in outputs], 10)
    for out, (tokens, logprobs) in zip(outputs, reference):
        assert out.outputs[0].token_ids == tokens
        for entry, ref in zip(out.outputs[0].logprobs, logprobs):
            values, ids = ref.topk(5)
            for value, token in zip(values.tolist(), ids.tolist()):
                assert entry[token].logprob == pytest.approx(value, abs=2e-4)


def test_jamba_preempts_when_kv_blocks_run_out(model_dirs):
    """The hybrid's budget splits into state slots and KV blocks; with few blocks the scheduler
    preempts (its own rule, not forced) and the recomputed requests still match transformers."""
    path = model_dirs["JambaForCausalLM"]
    kwargs = dict(dtype="float32", max_model_len=128, block_size=4)
    runner = LLM(path, kv_cache_memory=1 << 22, **kwargs).llm_engine.runner
    slot, block = runner.bytes_per_slot(), runner.bytes_per_block()
    # 32 blocks stay for one max_model_len request, 4 slots take the rest but one block
    llm = LLM(path, kv_cache_memory=4 * slot + 33 * block, max_num_seqs=4, **kwargs)
    kv = llm.llm_engine.kv
    assert (kv.num_blocks, kv.slots.num_slots) == (33, 4)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert kv.slots.num_free == 4 and kv.pool.num_free == 33
    reference = hf_greedy(path, [o.prompt_token_ids for o in outputs], 16)
    for out, (tokens, _) in zip(outputs, reference):
        assert out.outputs[0].token_ids == tokens


def test_jamba_with_fp8_kv_cache(model_dirs):
    """kv_cache_dtype="fp8" on the hybrid: its attention layers' K/V go to float8 blocks, the
    Mamba states stay as they are, and the prompt logprobs stay close to the fp32 cache's."""
    path = model_dirs["JambaForCausalLM"]
    kwargs = dict(dtype="float32", max_model_len=128, kv_cache_memory=1 << 22)
    auto, fp8 = LLM(path, **kwargs), LLM(path, kv_cache_dtype="fp8", **kwargs)
    runner = fp8.llm_engine.runner
    assert runner.attn_layers and all(m.k_cache.dtype == torch.float8_e4m3fn for m in runner.attn_layers)
    assert all(t.dtype != torch.float8_e4m3fn for t in runner._state_tensors)
    params = SamplingParams(max_tokens=4, prompt_logprobs=0)
    for a, b in zip(*(llm.generate(PROMPTS, params, use_tqdm=False) for llm in (auto, fp8))):
        la = torch.tensor([next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]])
        lb = torch.tensor([next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]])
        torch.testing.assert_close(lb, la, rtol=0, atol=0.1)


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "Mamba2ForCausalLM"])
def test_beam_search_matches_reference(arch, model_dirs):
    path = model_dirs[arch]
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24)
    prompt = [1, 45, 67, 89, 12, 34]
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = reference_beam_search(model, prompt, 3, 4)
    got = out[0].sequences
    assert [tuple(s.output_token_ids) for s in got] == [seq for seq, _ in ref]
    assert [s.cum_logprob for s in got] == pytest.approx([lp for _, lp in ref], abs=1e-4)


def test_tied_head_and_old_embedding_name(tmp_path):
    """Released Mamba checkpoints tie the head to the embedding (matched against transformers),
    and those converted before transformers renamed it call the embedding
    backbone.embedding.weight: that file gives the same logprobs as the renamed one."""
    path = build_tiny_ssm_model(str(tmp_path / "tied"), "MambaForCausalLM",
                                tie_word_embeddings=True, initializer_range=0.3)
    assert_matches_hf(path, prompts=PROMPTS[:4], max_tokens=6)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5)
    want = LLM(path, dtype="float32", kv_cache_memory=1 << 24).generate(PROMPTS[:4], params,
                                                                         use_tqdm=False)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    assert "lm_head.weight" not in state
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    save_file(state, weights, metadata={"format": "pt"})
    got = LLM(path, dtype="float32", kv_cache_memory=1 << 24).generate(PROMPTS[:4], params,
                                                                        use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs
