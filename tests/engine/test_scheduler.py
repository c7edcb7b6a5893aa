"""Scheduler: token budget, chunked prefill, continuous batching, preemption, stop checks."""
from octavo.kv_cache import KVCacheManager
from octavo.request import Request, RequestStatus
from octavo.sampling_params import SamplingParams
from octavo.scheduler import Scheduler


def make(num_blocks=16, block_size=4, max_num_seqs=8, budget=16, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, max_num_seqs, budget)


def req(rid, n_prompt, first=0, **kw):
    kw.setdefault("max_tokens", 4)
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(**kw), eos_token_ids=(2,))


def planned(out):
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


def step(s, token=7):
    out = s.schedule()
    sampled = {x.request.request_id: token for x in out.scheduled if x.samples}
    s.update(out, sampled)
    return out


def test_budget_chunks_long_prompts_and_batches_decodes():
    s = make(budget=10)
    a, b = req("a", 6, first=100), req("b", 7, first=200)
    s.add_request(a)
    s.add_request(b)
    out = step(s)
    assert planned(out) == [("a", 0, 6), ("b", 0, 4)]      # b's prompt is chunked
    assert a.output_token_ids == [7] and b.output_token_ids == []
    out = step(s)
    assert planned(out) == [("a", 6, 1), ("b", 4, 3)]      # a decodes while b finishes prefill
    assert b.output_token_ids == [7]
    out = step(s)
    assert planned(out) == [("a", 7, 1), ("b", 7, 1)]


def test_max_num_seqs_limits_admission():
    s = make(max_num_seqs=2, budget=64)
    for i in range(3):
        s.add_request(req(f"r{i}", 3, first=10 * i))
    out = step(s)
    assert [x[0] for x in planned(out)] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_preemption_frees_the_newest_request_and_recomputes_it():
    s = make(num_blocks=4, block_size=4, budget=64, caching=False)
    a, b = req("a", 4, max_tokens=20), req("b", 4, first=50, max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    step(s)                                                # a: block 0, b: block 1
    assert (a.block_ids, b.block_ids) == ([0], [1])
    for _ in range(4):                                     # both grow into a second block
        step(s)
    assert (a.block_ids, b.block_ids) == ([0, 2], [1, 3])
    for _ in range(4):                                     # a needs a third block: b goes
        out = step(s)
        if out.preempted:
            break
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert a.block_ids == [0, 2, 1]                        # b's first block, freed last
    assert list(s.waiting) == [b] and s.num_preemptions == 1
    kept = list(b.output_token_ids)
    s.finish_request(a, RequestStatus.FINISHED_ABORTED)
    out = step(s)                                          # b comes back and recomputes everything
    assert planned(out) == [("b", 0, b.num_tokens - 1)]
    assert b.output_token_ids[:len(kept)] == kept


def test_prefix_hit_skips_cached_tokens():
    s = make(budget=64)
    a = req("a", 9)
    s.add_request(a)
    step(s)
    b = req("b", 10)                                       # shares a's first two full blocks
    s.add_request(b)
    out = step(s)
    assert ("b", 8, 2) in planned(out)
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]


def test_stop_conditions():
    s = make(budget=64)
    eos = req("eos", 3)
    s.add_request(eos)
    step(s, token=2)
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    ign = req("ign", 3, ignore_eos=True, max_tokens=2)
    s.add_request(ign)
    step(s, token=2)
    assert not ign.is_finished
    step(s, token=2)
    assert ign.status == RequestStatus.FINISHED_LENGTH and ign.output_token_ids == [2, 2]
    sid = req("sid", 3, stop_token_ids=[5], min_tokens=2)
    s.add_request(sid)
    step(s, token=5)
    assert not sid.is_finished                             # min_tokens holds the stop id back
    step(s, token=5)
    assert sid.status == RequestStatus.FINISHED_STOPPED and sid.stop_reason == 5
    assert not s.has_unfinished() and s.kv.pool.num_free == s.kv.num_blocks


def test_position_limit_read_from_each_config_spelling():
    # remote-code configs name the limit differently (Kimi-Linear: model_max_length,
    # Jamba-v0.1: n_ctx); the first key found wins, in the order transformers' configs use
    from types import SimpleNamespace

    from octavo.config import _max_positions
    assert _max_positions(SimpleNamespace(model_max_length=1 << 20)) == 1 << 20
    assert _max_positions(SimpleNamespace(n_ctx=262144)) == 262144
    assert _max_positions(SimpleNamespace(max_position_embeddings=512, n_ctx=1024)) == 512
    assert _max_positions(SimpleNamespace()) is None
