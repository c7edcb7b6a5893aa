"""EngineConfig: every engine setting in one dataclass that validates itself."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
GiB = 1 << 30
logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    # a local directory, a .gguf file, a Hub id or None (the default model): see model_source.py
    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    # models with a per-request recurrent state (Mamba, hybrids): beam search steps and n > 1
    # siblings start from a copy of a finished request's state instead of recomputing the prompt
    enable_state_snapshots: bool = True
    kv_cache_memory: int | None = None          # bytes for K and V of all layers (CPU)
    gpu_memory_utilization: float = 0.9          # share of device memory (CUDA)
    device: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # None: "uni" (this process) for one rank, "mp" (a worker process per rank) for more;
    # "external_launcher": torchrun started every rank; "ray": one Ray actor per rank
    distributed_executor_backend: str | None = None
    quantization: str | None = None
    generation_config: str = "auto"
    enforce_eager: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    download_dir: str | None = None
    tokenizer_revision: str | None = None
    # vLLM's names, so that its code and command lines run unchanged (octavo.arg_utils)
    runner: str = "auto"                         # "auto" resolves to "generate"
    max_logprobs: int = 20                       # most logprobs a request may ask for; -1: any
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False            # fp8 cache: scales from the first batch
    load_format: str = "auto"
    tokenizer_mode: str = "auto"
    swap_space: float = 4.0                      # accepted, no effect (preemption recomputes)
    disable_log_stats: bool = False              # accepted, no effect (no periodic stats)
    # multi-LoRA (octavo.lora): adapters in max_loras device slots, max_cpu_loras in host memory
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None             # None: max_loras
    # speculative decoding (octavo.spec_decode): a dict as vLLM's, parsed into a SpeculativeConfig
    speculative_config: Any = None
    # the model as given, for display (served model name); `model` becomes the path loaded
    model_name: str | None = field(default=None, init=False)
    # filled by resolve(): the HF config and the chosen torch dtype / device
    hf_config: Any = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._check_vllm_options()
        from octavo.model_source import resolve_model
        source = resolve_model(self.model, self.revision, self.download_dir)
        self.model_name, self.model = source.name, source.path
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self._check_parallel()
        self._check_lora()
        self._check_speculative()
        if self.quantization is not None:
            from octavo.models.layers.quantization import SUPPORTED
            if not isinstance(self.quantization, str) or self.quantization.lower() not in SUPPORTED:
                raise ValueError(f"quantization={self.quantization!r} is not supported; supported "
                                 f"methods: {', '.join(SUPPORTED)} (or None: as the checkpoint says)")
            self.quantization = self.quantization.lower()
        if self.generation_config not in ("auto", "octavo", "vllm") and not os.path.isdir(self.generation_config):
            raise ValueError("generation_config must be 'auto', 'octavo' (or 'vllm', the same) "
                             "or a directory holding generation_config.json, got "
                             f"{self.generation_config!r}")
        if self.kv_cache_memory is None and self.device == "cpu":
            self.kv_cache_memory = int(float(os.environ.get("OCTAVO_CPU_KVCACHE_SPACE", "4")) * GiB)
        self._check_load_format()

    def _check_vllm_options(self) -> None:
        """The options that exist for vLLM compatibility: accept what octavo does, reject the
        rest with what to use instead."""
        if self.runner == "pooling":
            raise ValueError("runner='pooling' is not supported: octavo runs generative models "
                             "only; use runner='generate' (or 'auto')")
        if self.runner not in ("auto", "generate"):
            raise ValueError(f"runner must be 'auto' or 'generate', got {self.runner!r}")
        self.runner = "generate"
        if self.generation_config == "vllm":          # vLLM's name for "ignore the model's"
            self.generation_config = "octavo"
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be a non-negative integer (or -1: no cap), "
                             f"got {self.max_logprobs!r}")
        if self.kv_cache_dtype == "fp8_e4m3":          # vLLM's other name for it
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: use 'auto' "
                             "(the model dtype) or 'fp8' (e4m3, half the bytes)")
        if self.calculate_kv_scales and self.kv_cache_dtype != "fp8":
            raise ValueError("calculate_kv_scales=True scales an fp8 KV cache: add "
                             "kv_cache_dtype='fp8' (or drop calculate_kv_scales)")
        if self.tokenizer_mode != "auto":
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported: use "
                             "tokenizer_mode='auto'")
        if not isinstance(self.swap_space, (int, float)) or self.swap_space < 0:
            raise ValueError(f"swap_space must be a non-negative number of GiB, got {self.swap_space!r}")

    def _check_lora(self) -> None:
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _positive("max_cpu_loras", self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} is less than max_loras="
                             f"{self.max_loras}: the host cache must hold every adapter in a "
                             "slot; raise max_cpu_loras")
        if self.enable_lora and self.world_size > 1:
            raise ValueError("enable_lora runs in one process only: use tensor_parallel_size=1 "
                             "and pipeline_parallel_size=1 with LoRA adapters")

    def _check_speculative(self) -> None:
        from octavo.spec_decode.config import SpeculativeConfig
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        spec = self.speculative_config
        if spec is not None and spec.method != "ngram" and self.world_size > 1:
            raise ValueError(f"a {spec.method} draft runs in the engine's process: use "
                             "tensor_parallel_size=1 and pipeline_parallel_size=1 with it, or "
                             "the 'ngram' method, which needs no model")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def _check_parallel(self) -> None:
        """Rank counts and the executor backend (model-dependent sizes: check_parallel_sizes)."""
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        backends = ("uni", "mp", "external_launcher", "ray")
        backend = self.distributed_executor_backend
        if backend is None:
            backend = "uni" if self.world_size == 1 else "mp"
        if backend not in backends:
            raise ValueError(f"distributed_executor_backend must be one of {backends} (or None), "
                             f"got {backend!r}")
        if backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray "
                                 "(or use 'mp', the default, on one machine)") from None
        if backend == "uni" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank, but tensor_parallel"
                             f"_size * pipeline_parallel_size = {self.world_size}: use 'mp'")
        self.distributed_executor_backend = backend
        if backend != "mp":
            return
        if self.device == "cuda" and self.world_size > torch.cuda.device_count():
            raise ValueError(f"{self.world_size} ranks (tensor_parallel_size="
                             f"{self.tensor_parallel_size} x pipeline_parallel_size="
                             f"{self.pipeline_parallel_size}) need {self.world_size} GPUs, but "
                             f"this machine has {torch.cuda.device_count()}: lower the sizes, or "
                             "span machines with torchrun (external_launcher)")
        cpus = os.cpu_count() or 1
        if self.device == "cpu" and self.world_size > cpus:
            logger.warning("%d CPU ranks on %d cores: the ranks oversubscribe the cores (each "
                           "gets one thread) and run slower than fewer ranks would",
                           self.world_size, cpus)

    def check_parallel_sizes(self, hf_config: Any) -> None:
        """Heads and layers must split evenly over the ranks (the vocabulary need not: the
        last rank's embedding rows are padded)."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        heads = getattr(hf_config, "num_attention_heads", None)
        if isinstance(heads, int) and heads % tp:
            raise ValueError(f"the model's {heads} attention heads do not divide into "
                             f"tensor_parallel_size={tp} ranks: pick a divisor of {heads}")
        kv = getattr(hf_config, "num_key_value_heads", None)
        if isinstance(kv, int) and kv % tp and tp % kv:
            raise ValueError(f"the model's {kv} KV heads neither divide into nor replicate over "
                             f"tensor_parallel_size={tp} ranks: pick a divisor or multiple of {kv}")
        layers = getattr(hf_config, "num_hidden_layers", None)
        if pp > 1 and isinstance(layers, int) and layers % pp:
            raise ValueError(f"the model's {layers} layers do not divide into "
                             f"pipeline_parallel_size={pp} stages: pick a divisor of {layers}")

    def _check_load_format(self) -> None:
        """load_format names what the loader picks on its own; a mismatch is an error."""
        formats = ("auto", "safetensors", "pt", "gguf")
        if self.load_format not in formats:
            raise ValueError(f"load_format must be one of {formats}, got {self.load_format!r}")
        if self.load_format == "auto":
            return
        is_gguf = self.model.endswith(".gguf")
        if (self.load_format == "gguf") != is_gguf:
            raise ValueError(f"load_format={self.load_format!r} does not match model "
                             f"{self.model!r} ({'a' if is_gguf else 'not a'} .gguf file): use "
                             "load_format='auto'")
        if not is_gguf and os.path.isdir(self.model):
            from octavo.models.loader import weight_files   # the file the loader would read
            try:
                first = weight_files(self.model)[0]
            except FileNotFoundError:
                return                  # no weights: loading says so, naming what it expected
            if first.endswith(".safetensors") != (self.load_format == "safetensors"):
                raise ValueError(f"load_format={self.load_format!r}, but octavo would load "
                                 f"{os.path.basename(first)} from {self.model!r} (safetensors "
                                 "when present, else .bin): use load_format='auto'")

    def resolve(self, hf_config: Any) -> None:
        """Fill in what depends on the model's config: dtype, max_model_len, token budget."""
        self.hf_config = hf_config
        self.check_parallel_sizes(hf_config)
        self.torch_dtype = self._pick_dtype(hf_config)
        limit = _max_positions(hf_config)
        if self.max_model_len is None:
            self.max_model_len = limit or 2048
        elif limit is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's maximum of "
                             f"{limit} positions (max_position_embeddings); lower max_model_len")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(2048, min(self.max_model_len, 8192))

    def _pick_dtype(self, hf_config: Any) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            if self.dtype not in _DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
            return _DTYPES[self.dtype]
        # (getattr of the deprecated torch_dtype makes transformers print a warning)
        cfg_dtype = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
        if isinstance(cfg_dtype, str):
            cfg_dtype = _DTYPES.get(cfg_dtype, torch.float32)
        if cfg_dtype is None:
            return torch.float32
        if cfg_dtype == torch.float16 and self.device == "cpu":
            return torch.bfloat16          # fp16 math on CPU is slow and overflows more easily
        return cfg_dtype


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _max_positions(hf_config: Any) -> int | None:
    # (model_max_length: Kimi-Linear's own config class; n_ctx: Jamba-v0.1's)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                "model_max_length", "n_ctx"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
