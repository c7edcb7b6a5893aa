"""Bench workloads, as in vLLM's benchmark datasets: random token ids, ShareGPT JSON, and
prompts that repeat a few shared prefixes."""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from typing import Any


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    expected_output_len: int
    prompt: str | None = None          # the text, when the dataset is text (ShareGPT)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def add_dataset_args(p: argparse.ArgumentParser, default_output_len: int | None = 128) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random",
                   choices=["random", "sharegpt-json", "prefix-repetition"],
                   help="random: random token ids (any tokenizer); sharegpt-json PATH; "
                        "prefix-repetition: --num-prefixes shared prefixes of --prefix-len tokens, "
                        "each followed by --input-len unique tokens")
    g.add_argument("--dataset-path", help="ShareGPT JSON file (for --dataset sharegpt-json)")
    g.add_argument("--num-prompts", type=int, default=32)
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (after any prefix)")
    g.add_argument("--output-len", type=int, default=default_output_len,
                   help="output tokens (ShareGPT: default is the reply's length)")
    g.add_argument("--prefix-len", type=int, default=0, help="shared prefix tokens")
    g.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct prefixes")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len*(1-r), len*(1+r)]")
    g.add_argument("--dataset-seed", type=int, default=0)


def sample_requests(args: argparse.Namespace, vocab_size: int, tokenizer: Any = None) -> list[SampleRequest]:
    """Build the workload that args describe; raise ValueError on a bad combination."""
    if args.num_prompts <= 0:
        raise ValueError(f"--num-prompts must be positive, got {args.num_prompts}")
    if args.dataset == "sharegpt-json":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt-json needs --dataset-path PATH")
        if tokenizer is None:
            raise ValueError("--dataset sharegpt-json needs a tokenizer (--tokenizer or a local --model)")
        return sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.output_len,
                                 args.dataset_seed)
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.input_len <= 0 or args.output_len is None or args.output_len <= 0:
        raise ValueError("--input-len and --output-len must be positive for the "
                         f"{args.dataset} dataset")
    special = set(getattr(tokenizer, "all_special_ids", None) or [0, 1, 2])
    num_prefixes = args.num_prefixes if args.dataset == "prefix-repetition" else 1
    if args.dataset == "prefix-repetition" and args.prefix_len <= 0:
        raise ValueError("--dataset prefix-repetition needs --prefix-len > 0")
    return random_requests(args.num_prompts, args.input_len, args.output_len, args.prefix_len,
                           num_prefixes, args.random_range_ratio, vocab_size, special,
                           args.dataset_seed)


def _lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(num: int, input_len: int, output_len: int, prefix_len: int, num_prefixes: int,
                    ratio: float, vocab_size: int, special_ids: set[int], seed: int = 0
                    ) -> list[SampleRequest]:
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in special_ids]

    def draw(n: int) -> list[int]:
        return [allowed[rng.randrange(len(allowed))] for _ in range(n)]

    prefixes = [draw(prefix_len) for _ in range(num_prefixes)]
    in_lens, out_lens = _lengths(rng, num, input_len, ratio), _lengths(rng, num, output_len, ratio)
    return [SampleRequest(prefixes[i % num_prefixes] + draw(in_lens[i]), out_lens[i])
            for i in range(num)]


def sharegpt_requests(path: str, num: int, tokenizer: Any, output_len: int | None,
                      seed: int = 0) -> list[SampleRequest]:
    """First human turn as the prompt, the first reply's length as the output length (unless
    output_len is given); like vLLM, drop prompts or replies under 4 tokens and pairs over 2048."""
    with open(path) as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data
             if isinstance(d, dict) and len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out: list[SampleRequest] = []
    for conv in convs:
        prompt, reply = conv[0]["value"], conv[1]["value"]
        ids = tokenizer.encode(prompt)
        n_out = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if len(ids) < 4 or n_out < 4 or len(ids) > 1024 or len(ids) + n_out > 2048:
            continue
        out.append(SampleRequest(ids, n_out, prompt))
        if len(out) == num:
            return out
    raise ValueError(f"{path} has only {len(out)} usable conversations, fewer than "
                     f"--num-prompts {num}")
