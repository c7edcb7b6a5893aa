"""Per-request state slots (Mamba): the budget split, slot admission and release in the KV
manager, many requests through few slots, abort, n > 1, and a budget too small for one slot."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import TINY_SSM_ARCHS, TINY_SSM_COMMON, build_tiny_ssm_model
from octavo import LLM, SamplingParams
from octavo.kv_cache import KVCacheManager, split_cache_budget
from octavo.request import Request

ARCH = "MambaForCausalLM"


def _slot_bytes() -> int:
    """One request's state in the tiny Mamba, fp32: per layer a conv state [inter, W-1] and an
    SSM state [inter, N]."""
    cfg = {**TINY_SSM_COMMON, **TINY_SSM_ARCHS[ARCH]}
    inter = cfg["expand"] * cfg["hidden_size"]
    per_layer = inter * (cfg["conv_kernel"] - 1) + inter * cfg["state_size"]
    return per_layer * 4 * cfg["num_hidden_layers"]


def hf_greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    return build_tiny_ssm_model(str(tmp_path_factory.mktemp("mamba")), ARCH)


def _llm(path: str, num_slots: int, **kwargs) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=num_slots * _slot_bytes() + 100, **kwargs)


def test_split_cache_budget():
    assert split_cache_budget(1000, 0, 100, 256, 0) == (0, 10)          # pure state
    assert split_cache_budget(1000, 0, 100, 4, 0) == (0, 4)             # max_num_seqs caps
    # hybrid: one max-length request's 20 blocks (1000 bytes) stay; slots take 9000 of the rest
    assert split_cache_budget(10_000, 50, 1000, 256, 20) == (20, 9)
    assert split_cache_budget(10_000, 50, 1000, 2, 20) == (160, 2)
    assert split_cache_budget(1000, 50, 0, 4, 20) == (20, 0)             # no state layers
    with pytest.raises(ValueError, match="at least 1000"):
        split_cache_budget(999, 0, 1000, 4, 0)
    with pytest.raises(ValueError, match="at least 2000 or lower max_model_len"):
        split_cache_budget(1999, 50, 1000, 4, 20)


def _request(rid: str, n: int = 5) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4))


def test_manager_slots_without_blocks():
    kv = KVCacheManager(0, 16, enable_prefix_caching=False, num_state_slots=2)
    a, b, c = _request("a"), _request("b"), _request("c")
    assert kv.allocate(a, 5) and kv.allocate(b, 5)
    assert {a.state_slot, b.state_slot} == {0, 1} and not a.block_ids
    assert kv.allocate(a, 1)                      # a running request keeps its slot
    assert not kv.allocate(c, 5) and c.state_slot is None
    assert kv.usage == 1.0
    slot = a.state_slot
    kv.free(a)
    assert a.state_slot is None and kv.allocate(c, 5) and c.state_slot == slot
    kv.free(b), kv.free(c)
    assert kv.slots.num_free == 2 and kv.usage == 0.0


def test_manager_hybrid_needs_slot_and_blocks():
    kv = KVCacheManager(4, 4, enable_prefix_caching=False, num_state_slots=1)
    a, b = _request("a", 8), _request("b", 4)
    assert kv.allocate(a, 8) and len(a.block_ids) == 2
    assert not kv.allocate(b, 4)                  # blocks are free, the only slot is not
    assert kv.pool.num_free == 2 and not b.block_ids
    kv.free(a)
    c = _request("c", 20)
    assert not kv.allocate(c, 20)                 # 5 blocks: too many, and the slot stays free
    assert kv.slots.num_free == 1 and c.state_slot is None


def test_many_short_requests_through_few_slots(mamba_dir):
    llm = _llm(mamba_dir, 3)
    engine = llm.llm_engine
    assert engine.kv.slots.num_slots == 3 and engine.runner.bytes_per_slot() == _slot_bytes()
    sched, peak = engine.scheduler, []
    schedule = sched.schedule

    def spy():
        out = schedule()
        peak.append(len(sched.running))
        assert len({r.state_slot for r in sched.running}) == len(sched.running)   # no sharing
        return out

    sched.schedule = spy
    prompts = [[1] + [(7 * i + j) % 400 + 3 for j in range(2 + i % 5)] for i in range(12)]
    lengths = [3 + i % 4 for i in range(12)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0, max_tokens=n) for n in lengths],
                        use_tqdm=False)
    assert max(peak) == 3
    assert engine.kv.slots.num_free == 3
    # greedy tokens for n steps are the first n of max(lengths) steps
    for ref, n, out in zip(hf_greedy(mamba_dir, prompts, max(lengths)), lengths, outs):
        assert out.outputs[0].token_ids == ref[:n]


def test_abort_frees_the_slot(mamba_dir):
    llm = _llm(mamba_dir, 2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=6)
    for i, rid in enumerate("abc"):
        engine.add_request(rid, {"prompt_token_ids": [1, 10 + i, 20 + i]}, params)
    engine.step()
    assert engine.kv.slots.num_free == 0 and len(engine.scheduler.waiting) == 1
    engine.abort_request("a")
    assert engine.kv.slots.num_free == 1
    engine.step()                                    # c takes a's slot
    assert [r.request_id for r in engine.scheduler.running] == ["b", "c"]
    engine.add_request("d", {"prompt_token_ids": [1, 5]}, params)
    engine.abort_request("d")                         # aborted while waiting: held no slot
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.kv.slots.num_free == 2
    assert done["c"] == hf_greedy(mamba_dir, [[1, 12, 22]], 6)[0] and set(done) == {"b", "c"}


def test_n_samples_each_in_own_slot(mamba_dir):
    llm = _llm(mamba_dir, 4)
    prompt = {"prompt_token_ids": [1, 40, 41, 42, 43]}
    # top_k=1 samples the argmax (n > 1 refuses temperature 0)
    greedy = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=8),
                          use_tqdm=False)[0]
    ref = hf_greedy(mamba_dir, [prompt["prompt_token_ids"]], 8)[0]
    assert [c.token_ids for c in greedy.outputs] == [ref] * 3
    # seeded samples: each child as if it ran alone with its own seed (seed + index)
    both = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8,
                                               ignore_eos=True), use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8,
                                                 ignore_eos=True), use_tqdm=False)[0]
             for i in range(2)]
    assert [c.token_ids for c in both.outputs] == [a.outputs[0].token_ids for a in alone]
    assert both.outputs[0].token_ids != both.outputs[1].token_ids
    assert llm.llm_engine.kv.slots.num_free == 4


def test_budget_below_one_slot_is_an_error(mamba_dir):
    with pytest.raises(ValueError, match="does not hold one request.*kv_cache_memory"):
        LLM(mamba_dir, dtype="float32", kv_cache_memory=_slot_bytes() - 1)


def test_prefix_caching_is_off_with_reason(mamba_dir, caplog):
    with caplog.at_level("INFO", logger="octavo.llm_engine"):
        llm = _llm(mamba_dir, 2, enable_prefix_caching=True)
    assert not llm.llm_engine.kv.enable_prefix_caching
    assert "prefix caching is off" in caplog.text


def test_one_token_prompt_joins_a_decode_step(mamba_dir):
    """A one-token prompt admitted while the others decode makes a decode-only step: the decode
    ops read its slot, which the runner zeroed (a slot is reused from a finished request)."""
    llm = _llm(mamba_dir, 2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8)
    engine.add_request("warm", {"prompt_token_ids": [1, 9, 8, 7]}, SamplingParams(max_tokens=2))
    engine.add_request("long", {"prompt_token_ids": [1, 30, 31, 32]}, params)
    while "warm" in engine.parents:                  # leaves a used slot behind
        engine.step()
    engine.add_request("one", {"prompt_token_ids": [1]}, params)
    sizes = []
    execute = engine.executor.execute

    def spy(out):
        sizes.append([s.num_new_tokens for s in out.scheduled])
        return execute(out)

    engine.executor.execute = spy
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert sizes[0] == [1, 1]                        # "one"'s prompt rides in a decode step
    refs = hf_greedy(mamba_dir, [[1, 30, 31, 32], [1]], 8)
    assert [done["long"], done["one"]] == refs
