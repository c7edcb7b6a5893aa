"""State snapshots of recurrent-state models (Mamba, and Jamba with its K/V blocks): beam search
and n > 1 start from a copy of a known state instead of recomputing the prompt. Outputs equal
the recompute path (OCTAVO_STATE_SNAPSHOTS=0) and a plain-torch beam search; the tokens computed
are counted; chunked prefill, preemption and abort keep working; no slot or block leaks."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import build_tiny_ssm_model, reference_beam_search
from octavo import LLM, SamplingParams
from octavo.beam_search import BeamSearchParams
from octavo.kv_cache import KVCacheManager
from octavo.request import Request

PROMPT = [1, 45, 67, 89, 12, 34]
LONG_PROMPT = [1] + [(11 * j) % 300 + 3 for j in range(12)]
OTHER_PROMPT = [1] + [(7 * j) % 200 + 5 for j in range(12)]


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    return build_tiny_ssm_model(str(tmp_path_factory.mktemp("mamba")), "MambaForCausalLM")


@pytest.fixture(scope="module")
def jamba_dir(tmp_path_factory):
    return build_tiny_ssm_model(str(tmp_path_factory.mktemp("jamba")), "JambaForCausalLM")


def _llm(path: str, snapshots: bool, monkeypatch, **kwargs) -> LLM:
    monkeypatch.setenv("OCTAVO_STATE_SNAPSHOTS", "1" if snapshots else "0")
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24, **kwargs)
    assert llm.llm_engine.kv.state_snapshots == snapshots
    return llm


def _assert_no_leak(llm: LLM) -> None:
    engine = llm.llm_engine
    slots = engine.kv.slots
    assert not engine.has_unfinished_requests()
    assert slots.num_free == slots.num_slots
    assert len(slots.free_slots) + slots.num_snapshots == slots.num_slots
    assert len(set(slots.free_slots) | set(slots.snapshots)) == slots.num_slots
    assert not engine.scheduler.forks and not engine.scheduler.held
    if engine.kv.paged:
        assert engine.kv.pool.num_free == engine.kv.num_blocks


def _work(llm: LLM, fn):
    """fn()'s result and the tokens the model computed for it (scheduled over all steps)."""
    sched = llm.llm_engine.scheduler
    before = sched.num_scheduled_tokens
    result = fn()
    return result, sched.num_scheduled_tokens - before


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_snapshot_pool_prefix_lookup_and_eviction():
    kv = KVCacheManager(0, 16, enable_prefix_caching=False, num_state_slots=3,
                        state_snapshots=True)
    a = _request("a", [1, 2, 3])
    assert kv.allocate(a, 3)
    a.num_computed_tokens = 3
    slot_a = a.state_slot
    kv.free(a, keep_state=True)
    assert kv.slots.num_snapshots == 1 and kv.slots.num_free == 3
    assert kv.find_state_snapshot(_request("x", [1, 2, 3])) is None    # one token must be left
    assert kv.find_state_snapshot(_request("x", [1, 2, 4, 5])) is None  # not a prefix
    b = _request("b", [1, 2, 3, 7])
    assert kv.find_state_snapshot(b) == (slot_a, 3)
    assert kv.allocate(b, 1, snapshot=slot_a) and b.state_slot != slot_a
    assert kv.take_copies() == ([(slot_a, b.state_slot)], []) and kv.slots.num_snapshots == 1
    c, d = _request("c", [5, 6]), _request("d", [1, 2, 3, 9])
    assert kv.allocate(c, 2)                          # the last free slot; the snapshot stays
    assert kv.find_state_snapshot(d) == (slot_a, 3)
    assert kv.allocate(d, 1, snapshot=slot_a)         # only the snapshot's slot is left: taken
    assert d.state_slot == slot_a and kv.take_copies() == ([], []) and kv.slots.num_free == 0
    kv.free(b, keep_state=False)                      # aborted: no snapshot
    c.num_computed_tokens = 2
    kv.free(c, keep_state=True)
    e = _request("e", [8, 8, 8])
    assert kv.allocate(e, 3)                          # free list first, then the LRU snapshot
    assert kv.slots.num_snapshots == 1
    f = _request("f", [9, 9])
    assert kv.allocate(f, 2) and kv.slots.num_snapshots == 0 and kv.slots.num_free == 0
    for r in (d, e, f):
        kv.free(r)
    assert kv.slots.num_free == 3 and sorted(kv.slots.free_slots) == [0, 1, 2]


def test_the_same_state_is_kept_once():
    kv = KVCacheManager(0, 16, enable_prefix_caching=False, num_state_slots=3,
                        state_snapshots=True)
    a, b = _request("a", [1, 2, 3]), _request("b", [1, 2, 3])
    assert kv.allocate(a, 3) and kv.allocate(b, 3)
    a.num_computed_tokens = b.num_computed_tokens = 3
    kv.free(a, keep_state=True)
    kv.free(b, keep_state=True)
    assert list(kv.slots.snapshots) == [1] and kv.slots.num_free == 3      # b's slot
    assert kv.find_state_snapshot(_request("c", [1, 2, 3, 4])) == (1, 3)


def test_hybrid_snapshot_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(6, 4, enable_prefix_caching=False, num_state_slots=3,
                        state_snapshots=True)
    a = _request("a", list(range(1, 7)))               # 6 tokens: one full block, one partial
    assert kv.allocate(a, 6)
    a.num_computed_tokens = 6
    full, part = a.block_ids
    kv.free(a, keep_state=True)
    assert kv.pool.num_free == 6 and kv.slots.num_snapshots == 1   # the snapshot holds no block
    b = _request("b", list(range(1, 7)) + [9])
    snap = kv.find_state_snapshot(b)
    assert snap is not None and snap[1] == 6
    assert kv.allocate(b, 1, snapshot=snap[0])
    assert b.block_ids[0] == full and part not in b.block_ids and len(b.block_ids) == 2
    assert kv.take_copies() == ([(snap[0], b.state_slot)], [(part, b.block_ids[1])])
    kv.free(b)
    # reusing the partial block makes the snapshot invalid: it is dropped, not restored
    big = _request("big", [7] * 24)
    assert kv.allocate(big, 24) and part in big.block_ids and kv.slots.num_snapshots == 1
    assert kv.find_state_snapshot(_request("c", list(range(1, 7)) + [5])) is None
    assert kv.slots.num_snapshots == 0
    kv.free(big)
    assert kv.pool.num_free == 6 and kv.slots.num_free == 3


def _beams(llm: LLM, prompt: list[int], width: int, steps: int):
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    return [(tuple(s.output_token_ids), s.cum_logprob) for s in out[0].sequences]


def test_beam_search_computes_each_beam_token_once(mamba_dir, monkeypatch):
    """Width 3, 8 steps: with snapshots each step computes only the beams' newest tokens
    (linear); recomputing sends prompt + beam every step (quadratic). Same beams either way,
    and the plain-torch reference's."""
    width, steps, p = 3, 8, len(PROMPT)
    results = {}
    for snapshots in (False, True):
        llm = _llm(mamba_dir, snapshots, monkeypatch)
        results[snapshots] = _work(llm, lambda: _beams(llm, PROMPT, width, steps))
        _assert_no_leak(llm)
    (off, off_work), (on, on_work) = results[False], results[True]
    assert off_work == p + sum(width * (p + s) for s in range(1, steps))      # 216
    assert on_work == p + width * (steps - 1)                                 # 27
    model = AutoModelForCausalLM.from_pretrained(mamba_dir, dtype=torch.float32).eval()
    ref = reference_beam_search(model, PROMPT, width, steps)
    for got in (off, on):
        assert [seq for seq, _ in got] == [seq for seq, _ in ref]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in ref], abs=1e-4)


def _n_samples(llm: LLM, prompts: list[list[int]]):
    """n=3 greedy (top_k=1: n > 1 refuses temperature 0) of prompts[0], n=3 seeded of
    prompts[1]."""
    params = [SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=6),
              SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("budget", [None, 4])
def test_n_samples_start_from_the_first_childs_state(mamba_dir, monkeypatch, budget):
    """n=3, greedy and seeded, with and without chunked prefill: the same tokens as three
    full prefills, and the prompt is computed once (to its last token) plus the last token
    per child."""
    kwargs = {} if budget is None else {"max_num_batched_tokens": budget}
    results = {}
    for snapshots in (False, True):
        llm = _llm(mamba_dir, snapshots, monkeypatch, **kwargs)
        results[snapshots] = _work(llm, lambda: _n_samples(llm, [LONG_PROMPT, OTHER_PROMPT]))
        _assert_no_leak(llm)
    (off, off_work), (on, on_work) = results[False], results[True]
    assert on == off
    greedy, seeded = on
    assert greedy[0] == greedy[1] == greedy[2]
    assert len({tuple(t) for t in seeded}) > 1          # own seeds, own samples
    # per prompt: 3 whole prompts, or the prompt but its last token once + that token 3 times
    p = len(LONG_PROMPT)
    assert len(OTHER_PROMPT) == p and off_work - on_work == 2 * (3 * p - (p - 1 + 3))


def _force_preemptions(llm: LLM, every: int, limit: int) -> list[Request]:
    """Before every `every`-th step preempt the most recently admitted running request not
    preempted yet (the scheduler's own recompute preemption), `limit` times in all."""
    sched = llm.llm_engine.scheduler
    schedule, steps, victims = sched.schedule, itertools.count(1), []

    def schedule_with_preemption():
        fresh = [r for r in sched.running if r.num_preemptions == 0]
        if next(steps) % every == 0 and fresh and len(victims) < limit:
            victims.append(fresh[-1])
            sched.running.remove(fresh[-1])
            sched._preempt(fresh[-1])
        return schedule()

    sched.schedule = schedule_with_preemption
    return victims


def test_preemption_and_chunks_with_forks_and_beams(mamba_dir, monkeypatch):
    """Preempted first children (before their fork point) and restored siblings recompute
    from zero or from a snapshot and give the recompute path's tokens."""
    results = {}
    for snapshots in (False, True):
        llm = _llm(mamba_dir, snapshots, monkeypatch, max_num_batched_tokens=4, max_num_seqs=6)
        victims = _force_preemptions(llm, every=2, limit=5)
        samples = _n_samples(llm, [LONG_PROMPT, OTHER_PROMPT])
        beams = _beams(llm, LONG_PROMPT, 2, 4)
        assert llm.llm_engine.scheduler.num_preemptions == len(victims) > 0
        if snapshots:
            assert any(v.index == 0 for v in victims)      # a first child, while it forks
        _assert_no_leak(llm)
        results[snapshots] = (samples, [seq for seq, _ in beams])
    assert results[True] == results[False]


def test_abort_while_siblings_are_held(mamba_dir, monkeypatch):
    llm = _llm(mamba_dir, True, monkeypatch, max_num_batched_tokens=4)
    engine = llm.llm_engine
    engine.add_request("x", {"prompt_token_ids": LONG_PROMPT},
                       SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4))
    engine.step()                                    # the first child's first chunk
    assert len(engine.scheduler.held) == 2 and len(engine.scheduler.running) == 1
    engine.abort_request("x")
    _assert_no_leak(llm)
    assert engine.kv.slots.num_snapshots == 0        # aborted: its state is not kept
    out = llm.generate({"prompt_token_ids": LONG_PROMPT},
                       SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=3),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids
    _assert_no_leak(llm)


def test_hybrid_forks_and_beams(jamba_dir, monkeypatch):
    """Jamba (attention + Mamba layers): the snapshot's K/V blocks are shared (the partial one
    copied); n > 1 and beam search give the recompute path's tokens with the same savings."""
    results = {}
    width, steps, p = 2, 4, len(PROMPT)
    for snapshots in (False, True):
        llm = _llm(jamba_dir, snapshots, monkeypatch, max_num_batched_tokens=8, block_size=4)
        samples, work = _work(llm, lambda: _n_samples(llm, [LONG_PROMPT, OTHER_PROMPT]))
        beams, beam_work = _work(llm, lambda: _beams(llm, PROMPT, width, steps))
        _assert_no_leak(llm)
        results[snapshots] = (samples, beams, work, beam_work)
    off, on = results[False], results[True]
    assert on[0] == off[0]
    assert [s for s, _ in on[1]] == [s for s, _ in off[1]]
    assert [lp for _, lp in on[1]] == pytest.approx([lp for _, lp in off[1]], abs=1e-4)
    q = len(LONG_PROMPT)
    assert off[2] - on[2] == 2 * (3 * q - (q - 1 + 3))
    assert off[3] == p + sum(width * (p + s) for s in range(1, steps))
    assert on[3] == p + width * (steps - 1)


def test_hybrid_preempts_when_blocks_run_out(jamba_dir, monkeypatch):
    """Few KV blocks: the scheduler preempts (its own rule) while forks and beams restore
    snapshots whose blocks may have been reused; the tokens stay the recompute path's."""
    kwargs = dict(dtype="float32", max_model_len=32, block_size=4, max_num_seqs=4)
    runner = LLM(jamba_dir, kv_cache_memory=1 << 22, **kwargs).llm_engine.runner
    budget = 4 * runner.bytes_per_slot() + 9 * runner.bytes_per_block()
    results = {}
    for snapshots in (False, True):
        monkeypatch.setenv("OCTAVO_STATE_SNAPSHOTS", "1" if snapshots else "0")
        llm = LLM(jamba_dir, kv_cache_memory=budget, **kwargs)
        assert llm.llm_engine.kv.num_blocks == 9
        samples = _n_samples(llm, [LONG_PROMPT, OTHER_PROMPT])
        beams = _beams(llm, PROMPT, 2, 4)
        assert llm.llm_engine.scheduler.num_preemptions > 0
        _assert_no_leak(llm)
        results[snapshots] = (samples, [seq for seq, _ in beams])
    assert results[True] == results[False]
