"""Offline throughput: a batch of prompts through octavo's LLM.generate and/or transformers.

python -m octavo.bench.throughput --model DIR [--backend octavo|hf|both] [--dataset random]
    --input-len 128 --output-len 128 --num-prompts 32 [--output-json results.jsonl]
Like `vllm bench throughput`: every request ignores EOS and samples (temperature 1, top_p 1), so
each produces exactly its requested output length; the clock covers generation only (model
loading excluded). octavo detokenizes its outputs as vLLM does; transformers does not.
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from octavo.bench.datasets import SampleRequest, add_dataset_args, sample_requests
from octavo.bench.utils import (add_engine_args, engine_kwargs, engine_weight_bytes, suite_main,
                               write_jsonl)


@dataclass
class Result:
    backend: str
    elapsed: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    weight_bytes: int | None = None

    def record(self) -> dict[str, Any]:
        total = self.prompt_tokens + self.output_tokens
        return {"backend": self.backend, "elapsed_time": self.elapsed,
                "weight_bytes": self.weight_bytes,
                "num_requests": self.num_requests, "total_prompt_tokens": self.prompt_tokens,
                "total_output_tokens": self.output_tokens, "total_num_tokens": total,
                "requests_per_second": self.num_requests / self.elapsed,
                "tokens_per_second": total / self.elapsed,
                "output_tokens_per_second": self.output_tokens / self.elapsed}


def run_octavo(args: argparse.Namespace, requests: list[SampleRequest]) -> Result:
    from octavo import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True,
                             max_tokens=r.expected_output_len, seed=args.seed + i)
              for i, r in enumerate(requests)]
    loras = None
    if args.num_lora_adapters:              # prompt i runs with adapter i mod K
        import tempfile

        from octavo.bench.lora_adapters import random_lora_requests
        adapters = random_lora_requests(args.model, args.num_lora_adapters,
                                        llm.llm_engine.config.max_lora_rank,
                                        tempfile.mkdtemp(prefix="octavo-bench-lora-"))
        loras = [adapters[i % len(adapters)] for i in range(len(requests))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True, lora_request=loras)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    weights = engine_weight_bytes(llm.llm_engine)
    del llm
    gc.collect()
    return Result("octavo", elapsed, len(requests), sum(r.prompt_len for r in requests), out_tokens,
                  weights)


def hf_batches(requests: list[SampleRequest], max_batch: int, max_len: int = 2048):
    """Consecutive requests, as many as fit max_batch and (longest prompt + longest output)
    <= max_len, as vLLM's HF baseline groups them."""
    batch: list[SampleRequest] = []
    for r in requests:
        grown = batch + [r]
        longest = max(x.prompt_len for x in grown) + max(x.expected_output_len for x in grown)
        if batch and (len(grown) > max_batch or longest > max_len):
            yield batch
            grown = [r]
        batch = grown
    if batch:
        yield batch


def run_hf(args: argparse.Namespace, requests: list[SampleRequest], pad_id: int) -> Result:
    from transformers import AutoModelForCausalLM

    dtype = "auto" if args.dtype == "auto" else getattr(torch, _torch_dtype_name(args.dtype))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    model.to(device)
    torch.manual_seed(args.seed)
    out_tokens = 0
    bar = tqdm(total=len(requests), desc="HF generate", dynamic_ncols=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in hf_batches(requests, args.hf_max_batch_size):
            ids, mask = _left_pad([r.prompt_token_ids for r in batch], pad_id)
            new = max(r.expected_output_len for r in batch)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=args.n, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=pad_id, use_cache=True)
            generated = out.shape[1] - ids.shape[1]
            if generated != new:
                raise RuntimeError(f"transformers generated {generated} tokens, asked for {new}")
            # Count what was requested, not the padding rows generate beyond a shorter request.
            out_tokens += args.n * sum(r.expected_output_len for r in batch)
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    bar.close()
    del model
    gc.collect()
    return Result("hf", elapsed, len(requests), sum(r.prompt_len for r in requests), out_tokens)


def _torch_dtype_name(name: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(name, name)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def print_result(res: Result) -> None:
    r = res.record()
    print(f"[{res.backend}] Throughput: {r['requests_per_second']:.2f} requests/s, "
          f"{r['tokens_per_second']:.2f} total tokens/s, "
          f"{r['output_tokens_per_second']:.2f} output tokens/s")
    print(f"[{res.backend}] Total num prompt tokens:  {res.prompt_tokens}")
    print(f"[{res.backend}] Total num output tokens:  {res.output_tokens}")
    if res.weight_bytes:
        print(f"[{res.backend}] Weight memory: {res.weight_bytes / 2**20:.1f} MiB")


def _load_workload(args: argparse.Namespace) -> tuple[list[SampleRequest], int]:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    requests = sample_requests(args, config.vocab_size, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return requests, pad if pad is not None else 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.n <= 0 or args.hf_max_batch_size <= 0:
        raise ValueError("--n and --hf-max-batch-size must be positive")
    if args.num_lora_adapters < 0 or (args.num_lora_adapters and not args.enable_lora):
        raise ValueError("--num-lora-adapters needs --enable-lora (and is at least 0)")
    if args.model is None:      # the workload needs the model's own config and tokenizer
        raise ValueError("--model is required: a Hugging Face model directory")
    requests, pad_id = _load_workload(args)
    results = []
    if args.backend in ("octavo", "both"):
        results.append(run_octavo(args, requests))
    if args.backend in ("hf", "both"):
        results.append(run_hf(args, requests, pad_id))
    records = []
    for res in results:
        print_result(res)
        records.append(res.record())
    if len(results) == 2:
        ratio = records[0]["output_tokens_per_second"] / records[1]["output_tokens_per_second"]
        print(f"Ratio octavo/hf output tokens/s: {ratio:.2f}x")
        records[0]["ratio_vs_hf"] = ratio
    workload = {"suite": "throughput", "model": args.model, "dataset": args.dataset,
                "num_prompts": args.num_prompts, "input_len": args.input_len,
                "output_len": args.output_len, "prefix_len": args.prefix_len, "n": args.n,
                "random_range_ratio": args.random_range_ratio,
                "hf_max_batch_size": args.hf_max_batch_size,
                "num_lora_adapters": args.num_lora_adapters, "engine": engine_kwargs(args)}
    for rec in records:
        rec.update(workload)
        write_jsonl(args.output_json, rec)
    return records


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="octavo", choices=["octavo", "hf", "both"])
    p.add_argument("--n", type=int, default=1, help="sequences per prompt")
    p.add_argument("--hf-max-batch-size", type=int, default=32,
                   help="transformers: prompts per padded generate() batch")
    p.add_argument("--output-json", help="append results as JSON lines to this file")
    p.add_argument("--num-lora-adapters", type=int, default=0,
                   help="octavo: spread the prompts over this many random LoRA adapters of rank "
                        "--max-lora-rank (needs --enable-lora; --max-loras slots)")
    add_dataset_args(p)
    add_engine_args(p)


def main(argv: list[str] | None = None) -> None:
    suite_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
