"""EngineArgs: every engine option declared once (default, help text, flag), added to any
argparse parser and turned into `octavo.config.EngineConfig`, as vLLM's `EngineArgs` does.
Light to import (no torch): `octavo generate --help` reads it before anything heavy loads."""
from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from octavo.config import EngineConfig

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}

# The dtype names EngineConfig understands (its _DTYPES, which needs torch), for the flag's
# choices; tests/engine/test_arg_utils.py keeps the two lists equal.
DTYPE_CHOICES = ("auto", "float32", "float", "fp32", "bfloat16", "bf16", "float16", "half",
                 "fp16")
RUNNER_CHOICES = ("auto", "generate", "pooling")
LOAD_FORMAT_CHOICES = ("auto", "safetensors", "pt", "gguf")
TOKENIZER_MODE_CHOICES = ("auto",)

# Namespace attribute holding {field name: argparse dest} where a flag was renamed.
_DESTS = "_engine_arg_dests"


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1e9', '2G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or e.g. 4GiB, 512MiB")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or e.g. 4GiB, "
                                         "512MiB") from None


def _opt(default: Any, help: str, **flag: Any) -> Any:
    """A field with its CLI metadata: help, and argparse keywords (type, choices, metavar,
    action) plus `aliases` (short flags such as -tp)."""
    return field(default=default, metadata={"help": help, **flag})


_BOOL = argparse.BooleanOptionalAction       # --x / --no-x, as vLLM declares its booleans


@dataclass
class EngineArgs:
    """The engine's options; `LLM(model, **kwargs)` takes the same names."""

    model: str | None = _opt(
        None, "Hugging Face model: a local directory, a .gguf file (or a directory holding "
        "one) or a Hub id (org/name); none: the default model (SmolLM2-135M-Instruct)")
    tokenizer: str | None = _opt(None, "tokenizer directory or Hub id (default: the model's)")
    revision: str | None = _opt(None, "model revision on the Hub (branch, tag or commit; "
                                "default: the main branch)")
    tokenizer_revision: str | None = _opt(None, "tokenizer revision on the Hub (default: "
                                          "--revision)")
    download_dir: str | None = _opt(None, "directory for models downloaded from the Hub "
                                    "(default: the Hugging Face cache)")
    tokenizer_mode: str = _opt("auto", "'auto' only: octavo uses the fast (Rust) tokenizer "
                               "where the model has one", choices=TOKENIZER_MODE_CHOICES)
    trust_remote_code: bool = _opt(False, "allow models whose config needs the checkpoint's "
                                   "own code (InternLM2, Baichuan, ChatGLM, MiniCPM)",
                                   action=_BOOL)
    runner: str = _opt("auto", "model runner: 'generate' (or 'auto', the same thing); octavo "
                       "runs generative models only, so 'pooling' is an error",
                       choices=RUNNER_CHOICES)
    dtype: str = _opt("auto", "weight and activation dtype; auto: the checkpoint's (bfloat16 "
                      "instead of float16 on CPU)", choices=DTYPE_CHOICES)
    max_model_len: int | None = _opt(None, "context length in tokens (default: the model's)",
                                     type=int)
    load_format: str = _opt("auto", "weights to load: auto (safetensors, else .bin, or the "
                            ".gguf file), safetensors, pt (.bin) or gguf; must match what the "
                            "model holds", choices=LOAD_FORMAT_CHOICES)
    generation_config: str = _opt(
        "auto", "'auto' (default sampling values from the model's generation_config.json), "
        "'octavo' or 'vllm' (ignore it) or a directory holding one")
    seed: int = _opt(0, "engine random seed", type=int)
    max_logprobs: int = _opt(20, "most logprobs / prompt_logprobs a request may ask for "
                             "(-1: no cap)", type=int)
    quantization: str | None = _opt(None, "quantization method: gptq, awq, compressed-tensors, "
                                    "fp8 (read from the checkpoint's config.json when unset); "
                                    "int4 (round-to-nearest) or fp8 (per-channel) quantize a "
                                    "float checkpoint at load; GGUF weights stay quantized "
                                    "without it",
                                    aliases=("-q",))
    kv_cache_dtype: str = _opt("auto", "'auto' (the model dtype) or 'fp8' (float8 e4m3, half the "
                               "bytes of bf16; 'fp8_e4m3' is the same)")
    calculate_kv_scales: bool = _opt(False, "with kv_cache_dtype='fp8': each layer's K and V scales "
                                     "from the first batch's largest values (otherwise the "
                                     "checkpoint's k_scale/v_scale, else 1.0)", action=_BOOL)
    block_size: int = _opt(16, "tokens per KV-cache block (a power of two)", type=int)
    enable_prefix_caching: bool = _opt(True, "reuse the KV cache of shared prompt prefixes (on by "
                                       "default)",
                                       action=_BOOL)
    enable_state_snapshots: bool = _opt(
        True, "recurrent-state models (Mamba, Jamba, ...): beam search steps and n > 1 samples "
        "start from a copy of a known state instead of recomputing the prompt (on by default; "
        "the environment variable OCTAVO_STATE_SNAPSHOTS=0/1 overrides it)", action=_BOOL)
    kv_cache_memory: int | None = _opt(
        None, "KV-cache size on CPU, e.g. 512MiB or 2GiB (default: OCTAVO_CPU_KVCACHE_SPACE "
        "GiB, else 4GiB)", type=parse_bytes, metavar="SIZE")
    gpu_memory_utilization: float = _opt(0.9, "share of GPU memory the engine may use "
                                         "(weights + KV cache); CUDA only", type=float)
    swap_space: float = _opt(4.0, "accepted for vLLM compatibility, no effect: octavo "
                             "preempts by recomputation and swaps nothing to CPU memory",
                             type=float, metavar="GiB")
    device: str = _opt("auto", "device to run on (auto: cuda when torch sees one)",
                       choices=("auto", "cpu", "cuda"))
    tensor_parallel_size: int = _opt(1, "tensor-parallel ranks (each holds a slice of every "
                                     "layer)", type=int, aliases=("-tp",))
    pipeline_parallel_size: int = _opt(1, "pipeline-parallel stages (each holds a range of "
                                       "layers)", type=int, aliases=("-pp",))
    distributed_executor_backend: str | None = _opt(
        None, "how ranks run: 'mp' (a worker process per rank; the default for more than one), "
        "'external_launcher' (torchrun started every rank), 'ray' (a Ray actor per rank), "
        "'uni' (one process)",
        choices=("uni", "mp", "external_launcher", "ray"))
    max_num_seqs: int = _opt(256, "most requests running at once", type=int)
    max_num_batched_tokens: int | None = _opt(
        None, "token budget of one engine step (default: max(2048, min(max_model_len, 8192)))",
        type=int)
    enforce_eager: bool = _opt(False, "run every step eagerly: no decode buckets / CUDA graphs",
                               action=_BOOL)
    enable_lora: bool = _opt(False, "serve PEFT LoRA adapters (per request: LoRARequest, or the "
                             "server's --lora-modules / \"model\": adapter name)", action=_BOOL)
    max_loras: int = _opt(1, "adapters one engine step can use (device slots)", type=int)
    max_lora_rank: int = _opt(16, "largest adapter rank accepted (slots are sized for it)",
                              type=int)
    max_cpu_loras: int | None = _opt(None, "adapters kept loaded in host memory (default: "
                                     "--max-loras)", type=int)
    speculative_config: Any = _opt(None, "speculative decoding, as JSON: '{\"method\": \"ngram\", "
                                   "\"num_speculative_tokens\": 4}' or '{\"model\": DRAFT_DIR, "
                                   "\"num_speculative_tokens\": 4}'")
    disable_log_stats: bool = _opt(False, "accepted for vLLM compatibility, no effect: octavo "
                                   "logs no periodic statistics (the server's /metrics has "
                                   "them)", action="store_true")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, positional_model: bool = False,
                     rename: dict[str, str] | None = None,
                     title: str = "engine") -> argparse.ArgumentParser:
        """Add a flag per field (--max-model-len, ...). positional_model: the model is an
        optional positional argument, as in `octavo serve [MODEL]`, with --model also
        accepted. rename: field -> flag name where a command uses the plain name for something
        else (generate's --seed is the sampling seed: {"seed": "engine-seed"})."""
        rename = rename or {}
        group = parser.add_argument_group(title)
        dests: dict[str, str] = {}
        if positional_model:
            parser.add_argument("model_tag", nargs="?", default=None, metavar="model",
                                help=_help(cls._field("model")))
            dests["model_tag"] = "model_tag"
        for f in fields(cls):
            flag = rename.get(f.name, f.name.replace("_", "-"))
            dest = flag.replace("-", "_")
            if dest != f.name:
                dests[f.name] = dest
            kwargs = {k: v for k, v in f.metadata.items() if k not in ("help", "aliases")}
            group.add_argument(f"--{flag}", *f.metadata.get("aliases", ()), dest=dest,
                               default=f.default, help=_help(f), **kwargs)
        parser.set_defaults(**{_DESTS: dests})
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The EngineArgs of a namespace parsed by a parser that add_cli_args filled."""
        dests = getattr(args, _DESTS, {})
        values = {f.name: getattr(args, dests.get(f.name, f.name)) for f in fields(cls)
                  if hasattr(args, dests.get(f.name, f.name))}
        tag = getattr(args, "model_tag", None) if "model_tag" in dests else None
        if tag is not None:
            if values.get("model") not in (None, tag):
                raise ValueError(f"two models given ({tag!r} and --model {values['model']!r}): "
                                 "give the model once")
            values["model"] = tag
        return cls(**values)

    def create_engine_config(self) -> "EngineConfig":
        from octavo.config import EngineConfig     # imports torch: only when an engine is built
        return EngineConfig(**self.engine_kwargs())

    def engine_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (of EngineConfig, and of LLM)."""
        return asdict(self)

    @classmethod
    def _field(cls, name: str) -> Any:
        return next(f for f in fields(cls) if f.name == name)


def _help(f: Any) -> str:
    text = f.metadata["help"].replace("%", "%%")
    if not isinstance(f.default, bool) and f.default not in (None, MISSING) \
            and "default:" not in text:
        text += " (default: %(default)s)"
    return text
