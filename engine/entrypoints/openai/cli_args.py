"""Command-line arguments of the OpenAI-compatible server (`octavo serve MODEL ...`), and the
size parser every command line shares. Light to import (no torch): the CLI and bench use it."""
from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from octavo.config import EngineConfig

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1e9', '2G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or e.g. 4GiB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return value


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's and the engine's arguments (the model directory is positional)."""
    parser.add_argument("model", help="local Hugging Face model directory")
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model name(s) clients use (default: the model path)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 routes")
    srv.add_argument("--chat-template", default=None,
                     help="Jinja chat template, or a file holding one (default: the tokenizer's)")
    srv.add_argument("--allowed-origins", type=_json_list, default=["*"],
                     help="CORS allowed origins, a JSON list")
    srv.add_argument("--allowed-methods", type=_json_list, default=["*"])
    srv.add_argument("--allowed-headers", type=_json_list, default=["*"])
    srv.add_argument("--allow-credentials", action="store_true")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"])
    eng = parser.add_argument_group("engine")
    eng.add_argument("--tokenizer", default=None)
    eng.add_argument("--dtype", default="auto",
                     help="auto, float32, bfloat16 or float16")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=True)
    eng.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                     help="KV-cache size on CPU, e.g. 4GiB (default: OCTAVO_CPU_KVCACHE_SPACE)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    eng.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--enforce-eager", action="store_true",
                     help="run every step eagerly: no decode buckets / CUDA graphs")
    eng.add_argument("--trust-remote-code", action="store_true",
                     help="allow models whose config needs the checkpoint's own code (InternLM2, Baichuan, ChatGLM, MiniCPM)")
    eng.add_argument("--generation-config", default="auto",
                     help="'auto' (the model's generation_config.json), 'octavo' (none) or a "
                          "directory")
    return parser


def make_arg_parser() -> argparse.ArgumentParser:
    return add_serve_args(argparse.ArgumentParser(
        prog="octavo serve", description="OpenAI-compatible server for a local model"))


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    from octavo.config import EngineConfig
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, device=args.device, seed=args.seed,
        generation_config=args.generation_config, enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code)
