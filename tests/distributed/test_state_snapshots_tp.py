"""State snapshots under tensor parallelism: the step's state / K/V block copies travel to the
worker processes, so TP=2 Mamba and Jamba beam search and n > 1 give the single-process tokens
and the recompute path's, while computing as few tokens as the single-process snapshots do."""
from __future__ import annotations

import pytest

from tiny_models import build_tiny_ssm_model
from octavo import LLM, SamplingParams
from octavo.beam_search import BeamSearchParams
from octavo.distributed.step import from_wire, to_wire
from octavo.request import Request
from octavo.scheduler import ScheduledRequest, SchedulerOutput

PROMPT = [1, 45, 67, 89, 12, 34]
LONG_PROMPT = [1] + [(11 * j) % 300 + 3 for j in range(12)]
OTHER_PROMPT = [1] + [(7 * j) % 200 + 5 for j in range(12)]
WIDTH, STEPS = 2, 4
# Jamba: small blocks and a small token budget, so restored requests copy a partial block and
# prompts are chunked
ENGINE = {"MambaForCausalLM": {}, "JambaForCausalLM": dict(max_num_batched_tokens=8, block_size=4)}


def test_the_wire_carries_the_copies():
    req = Request("a", list(range(1, 11)), SamplingParams(max_tokens=2))
    req.block_ids, req.state_slot = [3, 5], 2
    out = SchedulerOutput([ScheduledRequest(req, 4, 6)], state_copies=[(1, 2), (2, 4)],
                          block_copies=[(7, 5)])
    back = from_wire(to_wire(out))
    assert back.state_copies == [(1, 2), (2, 4)] and back.block_copies == [(7, 5)]
    (s,) = back.scheduled
    assert (s.request.state_slot, s.request.block_ids, s.start, s.num_new_tokens) == (2, [3, 5], 6, 4)
    assert s.request.all_token_ids[6:10] == [7, 8, 9, 10]


def _run(llm: LLM) -> tuple[list, list, int]:
    """n=3 (greedy and seeded) samples, beams, and the tokens the model computed for them."""
    sched = llm.llm_engine.scheduler
    before = sched.num_scheduled_tokens
    params = [SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=5),
              SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=5, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": p} for p in (LONG_PROMPT, OTHER_PROMPT)], params,
                        use_tqdm=False)
    samples = [[list(c.token_ids) for c in o.outputs] for o in outs]
    beam = llm.beam_search({"prompt_token_ids": PROMPT},
                           BeamSearchParams(beam_width=WIDTH, max_tokens=STEPS, ignore_eos=True))
    beams = [(list(s.output_token_ids), s.cum_logprob) for s in beam[0].sequences]
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.slots.num_free == engine.kv.slots.num_slots          # no slot leaked
    return samples, beams, sched.num_scheduled_tokens - before


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "JambaForCausalLM"])
def test_two_tensor_parallel_ranks_restore_snapshots(tmp_path, monkeypatch, arch):
    monkeypatch.delenv("OCTAVO_STATE_SNAPSHOTS", raising=False)
    path = build_tiny_ssm_model(str(tmp_path / "m"), arch)
    kwargs = dict(dtype="float32", kv_cache_memory=1 << 24, **ENGINE[arch])
    results = {}
    for name, extra in (("off", dict(enable_state_snapshots=False)), ("on", {}),
                        ("tp2", dict(tensor_parallel_size=2))):
        llm = LLM(path, **kwargs, **extra)
        engine = llm.llm_engine
        try:
            assert engine.kv.state_snapshots == (name != "off")
            assert (engine.runner is None) == (name == "tp2")      # tp2: worker processes
            results[name] = _run(llm)
        finally:
            engine.executor.shutdown()
    (off_s, off_b, off_w), (on_s, on_b, on_w), (tp_s, tp_b, tp_w) = (
        results["off"], results["on"], results["tp2"])
    assert on_s == off_s and tp_s == on_s
    greedy, seeded = tp_s
    assert greedy[0] == greedy[1] == greedy[2] and len({tuple(t) for t in seeded}) > 1
    for beams in (on_b, tp_b):
        assert [s for s, _ in beams] == [s for s, _ in off_b]
        assert [lp for _, lp in beams] == pytest.approx([lp for _, lp in off_b], abs=1e-4)
    # the saving: per n=3 prompt, the prompt but its last token once plus that token 3 times
    # instead of 3 whole prompts; the beams compute only their newest token per step
    q, p = len(LONG_PROMPT), len(PROMPT)
    beam_off = p + sum(WIDTH * (p + s) for s in range(1, STEPS))
    beam_on = p + WIDTH * (STEPS - 1)
    assert off_w - on_w == 2 * (3 * q - (q - 1 + 3)) + beam_off - beam_on
    assert tp_w == on_w


def test_the_environment_variable_overrides_the_switch(tmp_path, monkeypatch):
    path = build_tiny_ssm_model(str(tmp_path / "m"), "MambaForCausalLM")
    monkeypatch.setenv("OCTAVO_STATE_SNAPSHOTS", "0")
    assert not LLM(path, kv_cache_memory=1 << 22).llm_engine.kv.state_snapshots
    monkeypatch.setenv("OCTAVO_STATE_SNAPSHOTS", "1")
    llm = LLM(path, kv_cache_memory=1 << 22, enable_state_snapshots=False)
    assert llm.llm_engine.kv.state_snapshots
    monkeypatch.setenv("OCTAVO_STATE_SNAPSHOTS", "off")
    with pytest.raises(ValueError, match="OCTAVO_STATE_SNAPSHOTS must be 0 or 1"):
        LLM(path, kv_cache_memory=1 << 22)
