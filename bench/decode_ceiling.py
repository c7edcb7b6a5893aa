"""Batch-1 decode against the memory ceiling: octavo's and transformers' time per output token
beside the time to read, once, the weights one token needs (its active parameters).

python -m octavo.bench.decode_ceiling --model DIR --dtype bfloat16 [--input-len 128
    --output-len 128 --num-iters 3 --backend both --output-json FILE]
Active parameters: every weight but the routed experts, plus top_k / num_experts of those (a
dense model: all of them); an untied input embedding is left out (a token reads one row of it).
Bandwidth is measured in the same run, before and after the timed runs, on a 512 MiB fp32
tensor: a copy (bytes read + written, as the kernel labs count) and a sum (bytes read). The
ceiling is the active bytes over the largest of those samples (the strictest ceiling). octavo's TPOT is latency.py's (engine.step() loop, temperature 1, ignore
EOS); transformers' is from `generate` (greedy, min_new_tokens = output_len), timed at each
step's logits processor. Medians over --num-iters iterations after one warm-up.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from octavo.bench.latency import run_batch
from octavo.bench.utils import add_engine_args, engine_kwargs, suite_main, write_jsonl

_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def active_parameters(config) -> tuple[int, int]:
    """(total, active per token) parameter counts of a transformers config (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = next((getattr(config, f) for f in _EXPERT_COUNT_FIELDS
                    if isinstance(getattr(config, f, None), int)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    tied = getattr(config, "tie_word_embeddings", False)
    total = active = 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name and experts and top_k:
            active += p.numel() * top_k / experts
        elif "embed_tokens" not in name or tied:
            active += p.numel()
    return int(total), int(active)


def bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> tuple[float, float]:
    """(copy GB/s counting read + write, read GB/s of a sum) on this machine, now."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    copy = 2 * nbytes / median_time(lambda: dst.copy_(src)) / 1e9
    read = nbytes / median_time(lambda: src.sum()) / 1e9
    return copy, read


def octavo_tpot(args: argparse.Namespace, prompt: list[int]) -> list[float]:
    from octavo import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    tpots = []
    for i in range(args.num_iters + 1):
        _, _, tpot = run_batch(llm.llm_engine, [prompt], params, f"it{i}")
        tpots.append(tpot[0])
    del llm
    gc.collect()
    return tpots[1:]


class _StepClock:
    """A logits processor that records the wall time of each generation step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_tpot(args: argparse.Namespace, prompt: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 trust_remote_code=args.trust_remote_code)
    ids = torch.tensor([prompt])
    tpots = []
    with torch.inference_mode():
        for _ in range(args.num_iters + 1):
            clock = _StepClock()
            model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                           do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
            tpots.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
    del model
    gc.collect()
    return tpots[1:]


_DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "half": "float16", "fp16": "float16"}


def _resolve_dtype(name: str, config) -> str:
    """--dtype as a torch dtype name; auto: the checkpoint's (bfloat16 for float16 off GPUs)."""
    if name == "auto":
        name = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        if name == "float16" and not torch.cuda.is_available():
            name = "bfloat16"
    return _DTYPE_NAMES[name]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    if args.output_len < 2 or args.input_len < 1 or args.num_iters < 1:
        raise ValueError("need --output-len >= 2, --input-len >= 1 and --num-iters >= 1")
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    args.dtype = _resolve_dtype(args.dtype, config)
    total, active = active_parameters(config)
    active_bytes = active * torch.finfo(getattr(torch, args.dtype)).bits // 8
    # Bandwidth is sampled before and after the timed runs and the best sample sets the ceiling:
    # a neighbour on a shared machine can only slow a sample down, so the best is the strictest.
    samples = [bandwidth()]
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, config.vocab_size, (args.input_len,), generator=gen).tolist()
    record: dict[str, Any] = {
        "suite": "decode_ceiling", "model": args.model, "dtype": args.dtype,
        "input_len": args.input_len, "output_len": args.output_len, "num_iters": args.num_iters,
        "total_params": total, "active_params": active, "active_bytes": active_bytes,
    }
    if args.backend in ("octavo", "both"):
        record["octavo_tpots"] = octavo_tpot(args, prompt)
        record["octavo_tpot"] = statistics.median(record["octavo_tpots"])
    if args.backend in ("hf", "both"):
        record["hf_tpots"] = hf_tpot(args, prompt)
        record["hf_tpot"] = statistics.median(record["hf_tpots"])
    samples.append(bandwidth())
    record["bandwidth_samples"] = samples
    record["copy_gbs"] = max(c for c, _ in samples)
    record["read_gbs"] = max(r for _, r in samples)
    record["ceiling_tpot"] = active_bytes / (max(record["copy_gbs"], record["read_gbs"]) * 1e9)
    print_record(record)
    write_jsonl(args.output_json, record)
    return record


def print_record(r: dict[str, Any]) -> None:
    print(f"Parameters: {r['total_params'] / 1e6:.1f}M total, {r['active_params'] / 1e6:.1f}M "
          f"active per token ({r['active_bytes'] / 1e6:.0f} MB in {r['dtype']})")
    print(f"Bandwidth (best of {len(r['bandwidth_samples'])} samples, before and after): copy "
          f"{r['copy_gbs']:.1f} GB/s (read + write), sum {r['read_gbs']:.1f} GB/s (read); "
          f"ceiling {r['ceiling_tpot'] * 1e3:.2f} ms per token")
    for name, key in (("octavo", "octavo_tpot"), ("transformers", "hf_tpot")):
        if key in r:
            print(f"{name} batch-1 TPOT (median): {r[key] * 1e3:.2f} ms = "
                  f"{r[key] / r['ceiling_tpot']:.2f}x the ceiling")
    if "octavo_tpot" in r and "hf_tpot" in r:
        print(f"transformers / octavo: {r['hf_tpot'] / r['octavo_tpot']:.2f}x")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--backend", default="both", choices=["octavo", "hf", "both"])
    p.add_argument("--output-json", help="append the result as a JSON line to this file")
    add_engine_args(p)


def main(argv: list[str] | None = None) -> None:
    suite_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
