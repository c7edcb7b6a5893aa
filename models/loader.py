"""Load a local Hugging Face checkpoint into an octavo model, one tensor at a time.

Files: model.safetensors, a sharded model.safetensors.index.json, other *.safetensors, or the
pytorch_model.bin(.index.json) fallback. Each checkpoint tensor is routed through the model's
`packed_modules_mapping` (q_proj -> qkv_proj shard 'q', ...) to a parameter's `weight_loader`,
which copies (and shards / casts) it in place, so at most one checkpoint tensor is in memory.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from octavo.models.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# Checkpoint tensors that are buffers recomputed at init, never parameters.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached",
                  ".attn.bias", ".attn.masked_bias")


def weight_files(model_dir: str) -> list[str]:
    """The checkpoint files to read, in order; raises naming what was expected."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            return _files_from_index(model_dir, index_path)
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(model_dir, f) for f in others]
    bin_file = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return [bin_file]
    raise FileNotFoundError(
        f"no weights found in {model_dir!r}: expected model.safetensors, "
        "model.safetensors.index.json (+ shards), *.safetensors, pytorch_model.bin or "
        "pytorch_model.bin.index.json")


def _files_from_index(model_dir: str, index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a valid checkpoint index (need a 'weight_map' "
                         f"object): {e}") from e
    files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shard files that are missing: "
                                f"{', '.join(os.path.basename(f) for f in missing)}")
    return files


def iterate_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every checkpoint tensor, streamed file by file."""
    for path in files:
        if path.endswith(".safetensors"):
            yield from _iterate_safetensors(path)
        else:
            yield from _iterate_bin(path)


def _iterate_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise ValueError(f"cannot read safetensors file {path!r} (truncated or corrupt?): {e}") from e
    for name in names:
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {path!r} (truncated or "
                             f"corrupt?): {e}") from e
        yield name, tensor


def _iterate_bin(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:  # mmap keeps the storage on disk; tensors are paged in as they are copied
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {path!r} (truncated or corrupt?): {e}") from e
    for name in list(state):
        yield name, state.pop(name)


def _route(name: str, packed: dict) -> tuple[str, object]:
    # 'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 'q')
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            target, shard_id = packed[part]
            return ".".join(parts[:i] + [target] + parts[i + 1:]), shard_id
    return name, None


def load_weights(model: nn.Module, model_dir: str, quantization: str | None = None) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`. Linear layers first
    get the method of the checkpoint's `quantization_config` (or of `quantization`, e.g.
    "int4" to quantize a float checkpoint at load), whose parameters the tensors then fill."""
    from octavo.models.layers.quantization import apply_quantization, get_quantization_config
    quant = get_quantization_config(getattr(model, "config", None), quantization)
    if quant is None and model_dir.endswith(".gguf") and _gguf_int4_enabled():
        from octavo.models.gguf_loader import q4_weight_names
        from octavo.models.layers.quantization.gguf import GGUFConfig
        quant = GGUFConfig(q4_weight_names(model_dir), getattr(model, "packed_modules_mapping", {}))
    apply_quantization(model, quant)
    keep_q4 = getattr(quant, "kept", set())
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    packed = getattr(model, "packed_modules_mapping", {})
    # a model may route names the packed mapping cannot express (one expert's tensor into a
    # stacked parameter): route_weight(name) -> (target, shard_id), or None for the usual way
    route = getattr(model, "route_weight", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: dict[str, set] = {}
    unexpected = []
    kv_scales = _KVScales(model)
    for name, tensor in _checkpoint_tensors(model, model_dir, keep_q4):
        if name.endswith(_SKIP_SUFFIXES) or (tied and name.startswith("lm_head.")):
            continue
        routed = route(name) if route is not None else None
        target, shard_id = routed if routed is not None else _route(name, packed)
        param = params.get(target)
        if param is None and kv_scales.load(name, tensor):
            continue
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r} cannot be loaded into {target!r}: {e}") from e
        loaded.setdefault(target, set()).add(shard_id)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use, e.g. %s",
                       len(unexpected), unexpected[:5])
    _check_complete(params, loaded, packed, model_dir)
    model.loaded_parameter_names = set(loaded)   # (optional ones a checkpoint may lack)
    if model_dir.endswith(".gguf") and _gguf_int4_enabled():
        _keep_gguf_head(model, model_dir)


class _KVScales:
    """An fp8 KV cache's per-layer scales as checkpoints store them (vLLM reads the same names):
    `<attn>.k_scale` / `.v_scale`, the older `<attn>.kv_scale` (both), or compressed-tensors'
    `<attn>.k_proj.output_scale` / `.v_proj.output_scale`, where <attn> is the module holding
    the layer's Attention (e.g. model.layers.0.self_attn). A per-head tensor gives its largest
    value (a scale too large only costs precision; one too small saturates)."""

    _SUFFIXES = ((".k_proj.output_scale", "k"), (".v_proj.output_scale", "v"),
                 (".kv_scale", "kv"), (".k_scale", "k"), (".v_scale", "v"))

    def __init__(self, model: nn.Module) -> None:
        from octavo.models.layers.attention import Attention
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}

    def _layer(self, prefix: str):
        if prefix in self.layers:
            return self.layers[prefix]
        inner = [m for name, m in self.layers.items() if name.startswith(prefix + ".")]
        return inner[0] if len(inner) == 1 else None

    def load(self, name: str, tensor: torch.Tensor) -> bool:
        for suffix, which in self._SUFFIXES:
            if name.endswith(suffix):
                layer = self._layer(name[:-len(suffix)])
                if layer is None:
                    return False
                value = float(tensor.float().max())
                if not (value > 0 and value != float("inf")):
                    raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale must be "
                                     f"positive and finite, got {value}")
                if "k" in which:
                    layer.k_scale = value
                if "v" in which:
                    layer.v_scale = value
                return True
        return False


def _keep_gguf_head(model: nn.Module, path: str) -> None:
    """A GGUF LM head stored in a quantized block type runs on the weight-only int8 kernel."""
    from octavo.models.gguf_loader import quantized_head
    from octavo.models.layers.embedding import ParallelLMHead
    head = getattr(model, "lm_head", None)
    if not isinstance(head, ParallelLMHead) or head.tp_size != 1 or head.bias is not None:
        return
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    w = quantized_head(path, tied)
    if w is not None and (w.n, w.k) == (head.num_embeddings, head.embedding_dim):
        head.woq_weight = w


def _gguf_int4_enabled() -> bool:
    # OCTAVO_GGUF_INT4=0 dequantizes GGUF Q4_0 / Q4_1 weights at load as before
    return os.environ.get("OCTAVO_GGUF_INT4", "1") == "1"


def _checkpoint_tensors(model: nn.Module, path: str,
                        keep_q4: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    if path.endswith(".gguf"):      # a llama.cpp file: HF-named tensors, dequantized but keep_q4
        from octavo.models.gguf_loader import iterate_gguf_weights
        return iterate_gguf_weights(path, model.config, keep_q4)
    return iterate_weights(weight_files(path))


def _check_complete(params: dict, loaded: dict, packed: dict, model_dir: str) -> None:
    shards_of: dict[str, set] = {}
    for target, shard_id in packed.values():
        shards_of.setdefault(target, set()).add(shard_id)
    missing = []
    for name, param in params.items():
        got = loaded.get(name)
        if got is None:
            if not getattr(param, "optional", False):   # e.g. GPTQ's g_idx without act-order
                missing.append(name)
            continue
        module = name.split(".")[-2] if "." in name else ""
        if module in shards_of and None not in got and not shards_of[module] <= got:
            missing.append(f"{name} (shards {sorted(map(str, shards_of[module] - got))})")
    if missing:
        raise ValueError(f"checkpoint in {model_dir!r} is missing {len(missing)} parameters the "
                         f"model needs, e.g. {', '.join(missing[:8])}")
