"""Latency of one batch: end-to-end, time to first token and time per output token.

python -m octavo.bench.latency --model DIR --input-len 32 --output-len 128 --batch-size 8
    [--num-iters-warmup 2 --num-iters 10 --output-json results.jsonl]
Like `vllm bench latency`: batch-size random prompts, ignore EOS, temperature 1; each iteration
is timed from submitting the batch to its last token. TTFT and TPOT come from the same
iterations: the engine is driven by its own step() loop (what LLM.generate does, minus the
progress bar) and the wall time at which each request's first token comes out is recorded.
TTFT of a request = first token time - submit time; TPOT = (end - first token) / (output_len - 1).
Every batch (warm-up, timed, profiled) starts from an empty prefix cache: the same prompts
again would otherwise find their blocks cached, and TTFT would be a cached prompt's (vLLM's
suite reuses its prompts the same way, but reports no TTFT). The record's `prefix_hits` counts
the prompt tokens found cached over the run (those shared inside one batch, as with --prompt).

--temperature T (default 1) and --prompt TEXT (every request's prompt, instead of random tokens)
make workloads where speculative decoding (--speculative-config) can help; its acceptance rate
is printed and recorded.

--profile: after the timed iterations, one more batch with each part of the step timed and one
with the forward split by op type (octavo.bench.step_profile); printed and kept in the record.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tqdm.auto import tqdm

from octavo.bench.datasets import random_requests
from octavo.bench.utils import (add_engine_args, engine_kwargs, engine_weight_bytes, percentiles,
                                suite_main, write_jsonl)

PERCENTILES = (10, 25, 50, 75, 90, 99)


def run_batch(engine: Any, prompts: list[list[int]], params: Any, tag: str
              ) -> tuple[float, list[float], list[float]]:
    """One batch through engine.step(): (latency, per-request TTFTs, per-request TPOTs)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    if not engine.reset_prefix_cache():
        raise RuntimeError("a latency batch must start with no request running")
    start = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first and any(c.token_ids for c in o.outputs):
                first[o.request_id] = now
            if o.finished:
                done[o.request_id] = now
    latency = time.perf_counter() - start
    ttfts = [first[r] - start for r in ids]
    steps = max(params.max_tokens - 1, 1)
    tpots = [(done[r] - first[r]) / steps for r in ids]
    return latency, ttfts, tpots


def run(args: argparse.Namespace) -> dict[str, Any]:
    from octavo import LLM, SamplingParams

    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must be >= 0")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    engine = LLM(**engine_kwargs(args)).llm_engine
    if args.prompt is not None:             # a given text (speculative decoding wants one)
        prompts = [engine.tokenizer.encode(args.prompt)] * args.batch_size
    else:
        special = set(engine.tokenizer.all_special_ids or [])
        reqs = random_requests(args.batch_size, args.input_len, args.output_len, 0, 1, 0.0,
                               engine.vocab_size, special, args.seed)
        prompts = [r.prompt_token_ids for r in reqs]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=1.0, ignore_eos=True,
                            max_tokens=args.output_len)
    for i in tqdm(range(args.num_iters_warmup), desc="Warmup iterations"):
        run_batch(engine, prompts, params, f"warmup{i}")
    latencies, ttfts, tpots = [], [], []
    for i in tqdm(range(args.num_iters), desc="Profiling iterations"):
        lat, tt, tp = run_batch(engine, prompts, params, f"iter{i}")
        latencies.append(lat)
        ttfts += tt
        tpots += tp
    profile = None
    if args.profile:
        from octavo.bench.step_profile import print_profile, profile_steps
        profile = profile_steps(engine, lambda tag: run_batch(engine, prompts, params, tag))
    record = {"suite": "latency", "backend": "octavo", "model": args.model,
              "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "n": args.n, "num_iters": args.num_iters,
              "avg_latency": statistics.mean(latencies), "latencies": latencies,
              "percentiles": percentiles(latencies, PERCENTILES),
              "avg_ttft": statistics.mean(ttfts), "ttft_percentiles": percentiles(ttfts, PERCENTILES),
              "avg_tpot": statistics.mean(tpots), "tpot_percentiles": percentiles(tpots, PERCENTILES),
              "ttft_method": "LLMEngine.step loop, wall time of each request's first token",
              "prefix_hits": engine.kv.prefix_hits,
              "weight_bytes": engine_weight_bytes(engine), "engine": engine_kwargs(args)}
    if profile is not None:
        record["profile"] = profile
    if engine.spec is not None:             # over warm-up and timed iterations alike
        st = engine.spec.stats
        record["spec_decode"] = {"num_drafts": st.num_drafts,
                                 "num_draft_tokens": st.num_draft_tokens,
                                 "num_accepted_tokens": st.num_accepted_tokens,
                                 "acceptance_rate": st.acceptance_rate,
                                 "mean_accepted_length": st.mean_accepted_length}
    print_record(record)
    if profile is not None:
        print_profile(profile)
    write_jsonl(args.output_json, record)
    return record


def print_record(r: dict[str, Any]) -> None:
    print(f"Avg latency: {r['avg_latency']:.6f} seconds")
    for p, v in r["percentiles"].items():
        print(f"{p}% percentile latency: {v:.6f} seconds")
    print(f"Avg time to first token: {r['avg_ttft'] * 1e3:.3f} ms "
          f"(median {r['ttft_percentiles']['50'] * 1e3:.3f} ms)")
    print(f"Avg time per output token: {r['avg_tpot'] * 1e3:.3f} ms "
          f"(median {r['tpot_percentiles']['50'] * 1e3:.3f} ms)")
    if r.get("weight_bytes"):
        print(f"Weight memory: {r['weight_bytes'] / 2**20:.1f} MiB")
    if "spec_decode" in r:
        sd = r["spec_decode"]
        print(f"Speculative decoding: acceptance rate {sd['acceptance_rate']:.3f}, mean "
              f"accepted length {sd['mean_accepted_length']:.2f} tokens per step "
              f"({sd['num_accepted_tokens']} of {sd['num_draft_tokens']} drafts)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="sequences per prompt")
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--prompt", help="this text as every request's prompt instead of random "
                   "tokens (--input-len is then ignored)")
    p.add_argument("--output-json", help="append the result as a JSON line to this file")
    p.add_argument("--profile", action="store_true",
                   help="also print where each step's time goes (sections of the step, the "
                   "forward by op type); two extra batches")
    add_engine_args(p)


def main(argv: list[str] | None = None) -> None:
    suite_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
