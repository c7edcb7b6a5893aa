"""LoRAManager: wraps a model's projections in LoRALinear, keeps adapters in an LRU host cache
(max_cpu_loras) and the ones a step uses in fixed device slots (max_loras, LRU swapping), and
fills the per-token slot indices before each forward."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .adapter import LoRAAdapter, load_adapter
from .layers import LoRAContext, LoRALinear, write_adapter
from .request import LoRARequest

logger = logging.getLogger(__name__)

# projections of the decoder layers that take adapters (checkpoint names, fused and not)
LORA_MODULES = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                "gate_up_proj", "gate_proj", "up_proj", "down_proj")


def wrap_model(model: nn.Module, ctx: LoRAContext, max_loras: int,
               max_rank: int) -> dict[str, LoRALinear]:
    """Replace every LORA_MODULES linear layer by a LoRALinear around it; returns them by the
    (checkpoint-style) module name PEFT uses, e.g. model.layers.0.self_attn.qkv_proj."""
    from octavo.models.layers.linear import LinearBase
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, LinearBase) and name.rpartition(".")[2] in LORA_MODULES]
    wrapped = {}
    for name, module in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, ctx, max_loras, max_rank)
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no projection LoRA can attach to "
                         f"(looked for {', '.join(LORA_MODULES)}): run it without enable_lora")
    return wrapped


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int,
                 max_tokens: int, device: torch.device, dtype: torch.dtype,
                 always: bool = False) -> None:
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max_cpu_loras
        self.dtype = dtype
        self.packed = getattr(model, "packed_modules_mapping", {})
        self.ctx = LoRAContext(max_tokens, device, always)
        self.layers = wrap_model(model, self.ctx, max_loras, max_rank)
        self.targets = {name: layer.target() for name, layer in self.layers.items()}
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()   # id -> adapter, LRU first
        self.slot_ids: list[int | None] = [None] * max_loras             # slot -> adapter id
        self.slot_lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))
        self.registered: dict[int, LoRARequest] = {}                      # id -> request
        self.num_disk_loads = 0
        self.num_slot_loads = 0
        self._host = np.full(max_tokens, -1, dtype=np.int64)

    # ---- host cache --------------------------------------------------------------------------
    def add_adapter(self, req: LoRARequest) -> LoRAAdapter:
        """Load (or find) an adapter in the host cache; a bad adapter raises ValueError."""
        known = self.registered.get(req.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (req.lora_name, req.lora_path):
            raise ValueError(f"lora_int_id {req.lora_int_id} is already adapter "
                             f"{known.lora_name!r} ({known.lora_path}); give {req.lora_name!r} "
                             "another id, or unload the first")
        adapter = self._host_copy(req)
        self.registered[req.lora_int_id] = req
        return adapter

    def _host_copy(self, req: LoRARequest) -> LoRAAdapter:
        """The adapter from the host cache, read from disk when it is not there (requests
        still running with an unloaded adapter re-read it without registering it again)."""
        adapter = self.cpu_cache.get(req.lora_int_id)
        if adapter is not None:
            self.cpu_cache.move_to_end(req.lora_int_id)
            return adapter
        adapter = load_adapter(req, self.targets, self.packed, self.max_rank, self.dtype)
        self.num_disk_loads += 1
        self.cpu_cache[req.lora_int_id] = adapter
        while len(self.cpu_cache) > self.max_cpu_loras:
            evicted, _ = self.cpu_cache.popitem(last=False)
            logger.debug("LoRA %d left the host cache", evicted)
        return adapter

    def remove_adapter(self, lora_int_id: int) -> bool:
        found = self.registered.pop(lora_int_id, None) is not None
        self.cpu_cache.pop(lora_int_id, None)
        for slot, held in enumerate(self.slot_ids):
            if held == lora_int_id:
                self.slot_ids[slot] = None
                for layer in self.layers.values():
                    layer.clear_slot(slot)
        return found

    def list_adapters(self) -> list[LoRARequest]:
        return list(self.registered.values())

    # ---- device slots ------------------------------------------------------------------------
    def activate(self, requests: Iterable[LoRARequest]) -> dict[int, int]:
        """Put every adapter of a step into a slot (evicting the least recently used slots the
        step does not need); returns adapter id -> slot."""
        needed = {r.lora_int_id: r for r in requests}
        if len(needed) > self.max_loras:
            raise RuntimeError(f"a step uses {len(needed)} adapters but there are only "
                               f"{self.max_loras} slots (the scheduler should have limited it)")
        where = {held: slot for slot, held in enumerate(self.slot_ids) if held is not None}
        for lid, req in needed.items():
            if lid in where:
                self.slot_lru.move_to_end(where[lid])
                continue
            slot = next(s for s in self.slot_lru if self.slot_ids[s] not in needed)
            adapter = self._host_copy(req)
            write_adapter(self.layers, slot, adapter)
            self.num_slot_loads += 1
            self.slot_ids[slot] = lid
            where[lid] = slot
            self.slot_lru.move_to_end(slot)
        return {lid: where[lid] for lid in needed}

    def prepare_step(self, rows: Iterable[tuple[LoRARequest | None, int]], pad_to: int) -> None:
        """rows: (adapter or None, token count) per scheduled request, in batch order; padding
        rows up to pad_to (a decode bucket) use no adapter."""
        rows = list(rows)
        slots = self.activate(r for r, _ in rows if r is not None)
        t = 0
        host = self._host
        for req, n in rows:
            host[t:t + n] = -1 if req is None else slots[req.lora_int_id]
            t += n
        total = max(t, pad_to)
        host[t:total] = -1
        self.ctx.active = bool(slots)
        if self.ctx.active or self.ctx.always:
            self.ctx.indices[:total].copy_(torch.from_numpy(host[:total]), non_blocking=True)
