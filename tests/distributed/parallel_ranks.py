"""One rank of test_parallel_parity's matrix, started as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): it runs every model of a job file on this rank's shard with the
external_launcher executor, one engine after another in the same process and process group, so
each rank imports torch once for all models. `python parallel_ranks.py JOB.json`; writes
rank<R>.json beside the job: per model the greedy ids, logprobs, prompt logprobs, preemption
count and KV block count this rank's engine saw."""
from __future__ import annotations

import json
import os
import sys
import time

# four prompts of 3 to 37 tokens (test tokenizer); with a budget of 16 tokens the long ones
# are prefilled in chunks
PROMPTS = [
    "Once upon a time, there was a little robot who loved to read books and",
    "A",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &.",
    "The capital of France is",
]
ENGINE = dict(dtype="float32", max_model_len=64, block_size=8, max_num_batched_tokens=16,
              enable_prefix_caching=False)
# 9 blocks of 8 tokens per rank (8 hold max_model_len): the four requests need 12 at once
KV_BLOCKS = 9


def sampling():
    from octavo import SamplingParams
    greedy = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    # one request alone (never preempted) with the logprobs of its prompt tokens
    prompt_logprobs = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    return greedy, prompt_logprobs


def summarize(llm) -> dict:
    """What a parity test compares, as plain JSON data."""
    greedy, prompt_logprobs = sampling()
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    prompt = llm.generate(PROMPTS[0], prompt_logprobs, use_tqdm=False)[0].prompt_logprobs
    engine = llm.llm_engine
    return dict(ids=[list(o.outputs[0].token_ids) for o in outs],
                logprobs=[[_plain(d) for d in o.outputs[0].logprobs] for o in outs],
                prompt=[_plain(d) for d in prompt],
                preemptions=engine.scheduler.num_preemptions, blocks=engine.kv.num_blocks)


def _plain(logprobs: dict | None) -> dict | None:
    return None if logprobs is None else {str(t): lp.logprob for t, lp in logprobs.items()}


def wait_ranks(procs: list, timeout: float) -> int | None:
    """Wait for every rank; the first that fails (or all, past the timeout) ends the others,
    which would wait for it in a collective. Returns the failed rank, or None."""
    deadline = time.monotonic() + timeout
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = next(r for r, p in enumerate(procs) if p.poll() is None)
        time.sleep(0.2)
    failed = failed if failed is not None else next(
        (r for r, p in enumerate(procs) if p.returncode != 0), None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return failed


def main(job_path: str) -> None:
    import torch.distributed as dist

    from octavo import LLM
    with open(job_path) as f:
        job = json.load(f)
    results = {}
    for case in job["cases"]:
        # the first engine joins the process group; the later ones find it initialised and
        # reuse it (and its TP groups: same sizes); no shutdown in between, which would end it
        llm = LLM(model=case["path"], tensor_parallel_size=job["tp"],
                  pipeline_parallel_size=job["pp"],
                  distributed_executor_backend="external_launcher",
                  kv_cache_memory=case["kv_cache_memory"], **ENGINE, **case["kwargs"])
        results[case["name"]] = summarize(llm)
        del llm
    out = os.path.join(os.path.dirname(job_path), f"rank{os.environ['RANK']}.json")
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()          # no rank tears down gloo while another still has traffic in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip C++ static destructors: tests/models/tp_util.py's note on a gloo abort
