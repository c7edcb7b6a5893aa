"""Shared pieces of the bench suites: engine flags, machine info, JSON-lines results."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any

from octavo.entrypoints.openai.cli_args import parse_bytes


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """EngineConfig fields as flags; only the ones given reach LLM(...)."""
    g = p.add_argument_group("engine (octavo.EngineConfig)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--kv-cache-memory", type=parse_bytes,
                   help="bytes of KV cache (CPU), e.g. 4GiB, 512MiB, 1e9")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run every step eagerly: no decode buckets / CUDA graphs")
    g.add_argument("--trust-remote-code", action="store_true", default=None)


_ENGINE_FIELDS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                  "block_size", "kv_cache_memory", "enable_prefix_caching", "device", "seed",
                  "enforce_eager", "trust_remote_code")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _ENGINE_FIELDS if getattr(args, k, None) is not None}


def machine_info() -> dict[str, Any]:
    import torch
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_jsonl(path: str | None, record: dict[str, Any]) -> None:
    """Append one result (with machine info and the command line) as one JSON line."""
    if not path:
        return
    full = {**record, "machine": machine_info(), "command": " ".join(sys.argv)}
    with open(path, "a") as f:
        f.write(json.dumps(full) + "\n")


def percentiles(values: list[float], points=(10, 25, 50, 75, 90, 99)) -> dict[str, float]:
    import numpy as np
    if not values:
        return {str(p): float("nan") for p in points}
    return {str(p): float(np.percentile(values, p)) for p in points}
