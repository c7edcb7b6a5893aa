"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into per-layer,
per-projection (A, B * scaling) pairs keyed by octavo's module names, checked against the model."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .request import LoRARequest

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)"
                  r"(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass
class LoRALayerTarget:
    """What one wrapped linear layer accepts: its input width and fused projections."""
    input_size: int
    slices: list[tuple[object, int]]          # (shard id, width), as LinearBase.output_slices


@dataclass
class LoRAAdapter:
    """An adapter in host memory. weights[module][i] = (A [r, in], B [width_i, r] with the
    scaling folded in) for projection i of that module, or None where the adapter has none."""
    request: LoRARequest
    rank: int
    weights: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for pairs in self.weights.values() for p in pairs if p is not None
                   for a, b in [p])


def _read_config(req: LoRARequest) -> dict:
    path = req.lora_path
    where = f"LoRA adapter {req.lora_name!r}"
    if not os.path.isdir(path):
        raise ValueError(f"{where}: lora_path {path!r} is not a directory (give the directory "
                         "PEFT's save_pretrained wrote)")
    cfg_path = os.path.join(path, _CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{where}: {path!r} has no {_CONFIG} (not a PEFT adapter directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot read {cfg_path}: {e}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; octavo serves LORA "
                         "adapters only")
    unsupported = {"use_dora": bool(cfg.get("use_dora")),
                   "bias": cfg.get("bias", "none") not in (None, "none"),
                   "modules_to_save": bool(cfg.get("modules_to_save")),
                   "fan_in_fan_out": bool(cfg.get("fan_in_fan_out"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{where}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} is not "
                         "supported: octavo applies plain LoRA (A, B, scaling) to linear layers")
    return cfg


def _read_tensors(req: LoRARequest) -> dict[str, torch.Tensor]:
    for name in _WEIGHTS:
        path = os.path.join(req.lora_path, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(path, device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input error
            raise ValueError(f"LoRA adapter {req.lora_name!r}: cannot read {path}: {e}") from None
    raise ValueError(f"LoRA adapter {req.lora_name!r}: {req.lora_path!r} holds neither "
                     f"{' nor '.join(_WEIGHTS)}")


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in it (or a regex)
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _scaling(cfg: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def load_adapter(req: LoRARequest, targets: dict[str, LoRALayerTarget],
                 packed_modules_mapping: dict, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read and check an adapter against the model's wrapped layers (`targets`, by octavo module
    name). Checkpoint projections fused in octavo (q_proj -> qkv_proj shard 'q') land in their
    slice; a fused checkpoint module (qkv_proj) is cut into its projections."""
    cfg = _read_config(req)
    where = f"LoRA adapter {req.lora_name!r}"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(req).items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                             "(embedding, DoRA and bias weights are not supported)")
        pairs.setdefault(m.group("module"), {})[m.group("kind")] = tensor
    if not pairs:
        raise ValueError(f"{where}: the adapter has no LoRA weights")
    adapter = LoRAAdapter(req, 0)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: module {module!r} has {sorted(ab)} but needs lora_A and "
                             "lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise ValueError(f"{where}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, expected [r, in] and [out, r]")
        if rank > max_rank:
            raise ValueError(f"{where}: rank {rank} (module {module!r}) is more than "
                             f"max_lora_rank={max_rank}: start the engine with max_lora_rank="
                             f"{rank} or more")
        adapter.rank = max(adapter.rank, rank)
        b = b.float() * _scaling(cfg, module, rank)
        _place(adapter, module, a.to(dtype), b.to(dtype), targets, packed_modules_mapping, where)
    return adapter


def _place(adapter: LoRAAdapter, module: str, a: torch.Tensor, b: torch.Tensor,
           targets: dict[str, LoRALayerTarget], packed: dict, where: str) -> None:
    parent, _, leaf = module.rpartition(".")
    shard = None
    name = module
    if leaf in packed and module not in targets:
        fused, shard = packed[leaf]
        name = f"{parent}.{fused}" if parent else fused
    target = targets.get(name)
    if target is None:
        known = sorted({n.rpartition(".")[2] for n in targets} |
                       {k for k, (fused, _) in packed.items()
                        if any(n.endswith("." + fused) for n in targets)})
        raise ValueError(f"{where}: it targets module {module!r}, which this model has no "
                         f"LoRA-capable layer for (supported: {', '.join(known)})")
    if a.shape[1] != target.input_size:
        raise ValueError(f"{where}: module {module!r} takes {a.shape[1]} inputs but the model's "
                         f"layer takes {target.input_size} (an adapter of another base model?)")
    slots = adapter.weights.setdefault(name, [None] * len(target.slices))
    widths = [w for _, w in target.slices]
    if shard is None:                    # the whole layer: A shared, B cut per projection
        if b.shape[0] != sum(widths):
            raise ValueError(f"{where}: module {module!r} has {b.shape[0]} outputs but the "
                             f"model's layer has {sum(widths)} (an adapter of another base model?)")
        for i, part in enumerate(b.split(widths)):
            slots[i] = (a, part.contiguous())
        return
    i = next(k for k, (sid, _) in enumerate(target.slices) if sid == shard)
    if b.shape[0] != widths[i]:
        raise ValueError(f"{where}: module {module!r} has {b.shape[0]} outputs but the model's "
                         f"projection has {widths[i]} (an adapter of another base model?)")
    slots[i] = (a, b)
