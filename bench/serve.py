"""Online serving benchmark against any OpenAI-compatible server (/v1/completions, streamed).

python -m octavo.bench.serve --base-url http://127.0.0.1:8000 --model NAME [--tokenizer DIR]
    --dataset random --num-prompts 100 --request-rate 4 [--max-concurrency 8]
    [--output-json results.jsonl]
Like `vllm bench serve`: requests arrive as a Poisson process (--request-rate inf sends them all
at once), each streams its completion with ignore_eos; TTFT is the time to the first chunk that
carries choices, ITL the gaps between later such chunks, TPOT (e2e - TTFT) / (output tokens - 1).
Output tokens are the server's usage.completion_tokens when it reports them, else the number of
chunks with choices. Random prompts are sent as token-id lists (OpenAI's API accepts them), so
the server sees exactly --input-len tokens; --prompt-format text sends them decoded with the
tokenizer instead (--tokenizer, or --model when it is a local directory).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from octavo.bench.datasets import SampleRequest, add_dataset_args, sample_requests
from octavo.bench.utils import suite_main, write_jsonl


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def send_request(client: Any, url: str, model: str, req: SampleRequest, prompt: Any,
                       extra: dict[str, Any]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": req.expected_output_len,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **extra}
    res = RequestResult(prompt_len=req.prompt_len)
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                # Like vLLM's bench, any chunk with choices is a token event, even one whose
                # text is empty (a partial UTF-8 character, a skipped special token).
                if chunk.get("choices"):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens", res.output_tokens)
                    res.prompt_len = usage.get("prompt_tokens", res.prompt_len)
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "the stream carried no choices"
    except Exception as e:  # noqa: BLE001  (a failed request is counted, never fatal)
        res.error = f"{type(e).__name__}: {e}"
    return res


async def arrivals(n: int, rate: float, burstiness: float, seed: int):
    """Yield 0..n-1 with gamma-distributed gaps (Poisson process when burstiness is 1)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


async def benchmark(args: argparse.Namespace, requests: list[SampleRequest], prompts: list[Any]
                    ) -> tuple[list[RequestResult], float]:
    import httpx

    url = args.base_url.rstrip("/") + args.endpoint
    extra = json.loads(args.extra_body) if args.extra_body else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc="Requests", dynamic_ncols=True)
    timeout = httpx.Timeout(args.request_timeout)
    conns = httpx.Limits(max_connections=args.max_concurrency or None)
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'EMPTY')}"}
    async with httpx.AsyncClient(timeout=timeout, limits=conns, headers=headers) as client:
        async def one(i: int) -> RequestResult:
            async with limit:
                r = await send_request(client, url, args.served_model_name or args.model,
                                       requests[i], prompts[i], extra)
            bar.update(1)
            return r

        tasks = []
        start = time.perf_counter()
        async for i in arrivals(len(requests), args.request_rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def summarize(results: list[RequestResult], duration: float, percentiles=(99,)) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    m: dict[str, Any] = {"completed": len(ok), "failed": len(results) - len(ok),
                         "duration": duration, "total_input_tokens": in_tokens,
                         "total_output_tokens": out_tokens,
                         "request_throughput": len(ok) / duration,
                         "output_throughput": out_tokens / duration,
                         "total_token_throughput": (in_tokens + out_tokens) / duration,
                         "errors": sorted({r.error for r in results if r.error})[:5]}
    series = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
              "e2el": [r.latency for r in ok]}
    for name, values in series.items():
        ms = np.array(values or [float("nan")]) * 1e3
        m[f"mean_{name}_ms"] = float(ms.mean())
        m[f"median_{name}_ms"] = float(np.median(ms))
        m[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            m[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return m


def print_metrics(m: dict[str, Any]) -> None:
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
            ("Total Token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v:<10}")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        print("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            label = {"mean": "Mean", "median": "Median", "p99": "P99"}[stat]
            print(f"{label + ' ' + key.upper() + ' (ms):':<40}{m[f'{stat}_{key}_ms']:<10.2f}")
    print("=" * 50)
    for err in m["errors"]:
        print(f"error: {err}")


def _tokenizer(args: argparse.Namespace) -> Any:
    path = args.tokenizer or (args.model if os.path.isdir(args.model) else None)
    if path is None:
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise ValueError("--max-concurrency must be positive")
    tok = _tokenizer(args)
    vocab = len(tok) if tok is not None else args.vocab_size
    requests = sample_requests(args, vocab, tok)
    prompts = [r.prompt if r.prompt is not None
               else (r.prompt_token_ids if args.prompt_format == "token-ids" or tok is None
                     else tok.decode(r.prompt_token_ids, skip_special_tokens=True))
               for r in requests]
    results, duration = asyncio.run(benchmark(args, requests, prompts))
    m = summarize(results, duration)
    print_metrics(m)
    record = {"suite": "serve", "backend": args.backend_name, "base_url": args.base_url,
              "model": args.model, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len,
              "request_rate": str(args.request_rate), "max_concurrency": args.max_concurrency,
              "burstiness": args.burstiness, **m}
    write_jsonl(args.output_json, record)
    return record


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", required=True, help="model name sent to the server (and the "
                   "tokenizer's directory when it is a local path)")
    p.add_argument("--served-model-name", help="send this name instead of --model")
    p.add_argument("--tokenizer", help="tokenizer directory for building prompts")
    p.add_argument("--prompt-format", default="token-ids", choices=["token-ids", "text"],
                   help="random prompts: token-id lists (exact lengths; OpenAI's API accepts "
                        "them) or text decoded with the tokenizer (the server re-tokenizes it, "
                        "usually into more tokens)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="random token ids below this when there is no tokenizer")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--extra-body", help="JSON merged into every request body")
    p.add_argument("--backend-name", default="openai", help="label stored in the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="append the result as a JSON line to this file")
    add_dataset_args(p)


def main(argv: list[str] | None = None) -> None:
    suite_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
