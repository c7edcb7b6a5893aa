"""Shared checks of the speculative-decoding tests."""
from __future__ import annotations

from octavo import LLM


def collect_drafts(llm: LLM, prompts: list[str], params) -> list[tuple[list[int], list[int]]]:
    """Step the engine over the prompts; after every step, (tokens so far, drafts) of each
    running request that has drafts."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        seen += [(list(r.all_token_ids), list(r.spec_token_ids)) for r in engine.scheduler.running
                 if r.spec_token_ids]
    return seen


def assert_preemption_keeps_outputs(model: str, spec: dict, prompts: list[str], params,
                                    blocks: int = 18, **kw) -> None:
    """Greedy outputs of a speculative engine whose KV cache holds `blocks` blocks of 4 tokens
    (so that requests get preempted) equal plain decoding's, and every block comes back."""
    kw = dict(enforce_eager=True, block_size=4, max_model_len=64, max_num_seqs=4, **kw)
    plain = LLM(model=model, **kw).generate(prompts, params, use_tqdm=False)
    probe = LLM(model=model, speculative_config=spec, **kw).llm_engine.runner
    per_block = probe.bytes_per_block() + probe.extra_bytes_per_block
    llm = LLM(model=model, speculative_config=spec, kv_cache_memory=blocks * per_block, **kw)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.kv.pool.num_free == llm.llm_engine.kv.num_blocks == blocks
