"""Shared pieces of the bench suites: engine flags (EngineArgs), machine info, JSON-lines
results."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any, Callable

from octavo.arg_utils import EngineArgs


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags (EngineArgs: --model, --dtype, --max-num-seqs, --seed, ...)."""
    EngineArgs.add_cli_args(p, title="engine (octavo.arg_utils.EngineArgs)")


def suite_main(doc: str, add_args: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], Any], argv: list[str] | None = None) -> None:
    """`python -m octavo.bench.<suite>`: the suite's flags (add_args), then run(args); a
    ValueError from run is a usage error (its message, exit status 2), as under `octavo bench`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_args(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        p.error(str(e))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(**engine_kwargs(args)): every engine option, as given or defaulted."""
    return EngineArgs.from_cli_args(args).engine_kwargs()


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


def weight_bytes(model: Any) -> int:
    """Bytes of every tensor a model holds: parameters, buffers and the tensors modules keep as
    attributes (packed and quantized weights, alone or in tuples), each storage counted once;
    the KV cache is left out."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            if t.device.type == "meta" or not t.numel():
                return
            try:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
            except NotImplementedError:          # opaque (e.g. oneDNN-packed) tensors
                key, nbytes = id(t), t.numel() * t.element_size()
            seen[key] = max(seen.get(key, 0), nbytes)
        elif isinstance(t, (tuple, list)):
            for x in t:
                add(x)

    cache = {id(c) for m in model.modules() for c in (getattr(m, "kv_cache", None) or ())
             if isinstance(c, torch.Tensor)}
    for m in model.modules():
        for name, value in vars(m).items():
            if name in ("_parameters", "_buffers"):
                for t in value.values():
                    add(t)
            elif id(value) not in cache and "cache" not in name:
                add(value)         # private ones too: FusedMoE keeps its packed experts in _prepared
    return sum(seen.values())


def engine_weight_bytes(engine: Any) -> int | None:
    """weight_bytes of the engine's model (None when worker processes hold it)."""
    runner = getattr(engine, "runner", None)
    return None if runner is None else weight_bytes(runner.model)


def percentiles(values: list[float], points=(10, 25, 50, 75, 90, 99)) -> dict[str, float]:
    import numpy as np
    if not values:
        return {str(p): float("nan") for p in points}
    return {str(p): float(np.percentile(values, p)) for p in points}
