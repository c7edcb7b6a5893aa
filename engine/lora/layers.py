"""LoRALinear: a linear layer plus the adapters in its device slots, applied per token.

y = base(x); then, for rows whose slot s >= 0, y[:, projection i] += B_i[s] @ (A_i[s] @ x),
one shrink (the A's of every projection stacked) and one expand per projection. The slot of
each token comes from the shared LoRAContext, which the model runner fills before a forward
(static buffers, so decode CUDA graphs replay with new slots and new adapter weights)."""
from __future__ import annotations

import torch
from torch import nn

from octavo import ops

from .adapter import LoRAAdapter, LoRALayerTarget


class LoRAContext:
    """Per-token adapter slots of the current step: indices[:T] (-1: the base model)."""

    def __init__(self, max_tokens: int, device: torch.device, always: bool = False) -> None:
        self.indices = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.active = False           # any row of this step uses an adapter
        self.always = always          # CUDA graphs: the LoRA ops are part of every captured step

    def slots(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.indices.shape[0]:
            raise ValueError(f"LoRA: a step of {num_tokens} tokens is larger than the "
                             f"{self.indices.shape[0]} the slot buffer holds")
        return self.indices[:num_tokens]


class LoRALinear(nn.Module):
    """Wraps a LinearBase (any quant method); holds max_loras slots of rank max_rank."""

    def __init__(self, base: nn.Module, ctx: LoRAContext, max_loras: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.max_rank = max_rank
        self.slices = base.output_slices()
        self.input_size = base.input_size_per_partition
        weight = next((p for p in base.parameters() if p.is_floating_point()), None)
        dtype = base.params_dtype
        device = weight.device if weight is not None else ctx.indices.device
        r = max_rank
        # A of every projection stacked: one shrink per layer -> [T, S * R]
        self.register_buffer("lora_a", torch.zeros(max_loras, len(self.slices) * r,
                                                   self.input_size, dtype=dtype, device=device),
                             persistent=False)
        self.lora_b = [torch.zeros(max_loras, width, r, dtype=dtype, device=device)
                       for _, width in self.slices]
        offsets, off = [], 0
        for _, width in self.slices:
            offsets.append(off)
            off += width
        self.offsets = offsets

    def target(self) -> LoRALayerTarget:
        return LoRALayerTarget(self.input_size, list(self.slices))

    def set_slot(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write one adapter's weights of this layer (None: it has none here) into a slot."""
        r = self.max_rank
        self.lora_a[slot].zero_()
        for i, b_all in enumerate(self.lora_b):
            b_all[slot].zero_()
            pair = pairs[i] if pairs is not None else None
            if pair is None:
                continue
            a, b = pair
            rank = a.shape[0]
            self.lora_a[slot, i * r:i * r + rank].copy_(a, non_blocking=True)
            b_all[slot, :, :rank].copy_(b, non_blocking=True)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not (self.ctx.active or self.ctx.always):
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        idx = self.ctx.slots(x2.shape[0])
        buf = ops.lora_shrink(x2, self.lora_a, idx)             # [T, S * R] float32
        r = self.max_rank
        for i, b_all in enumerate(self.lora_b):
            ops.lora_expand(y2, buf[:, i * r:(i + 1) * r], b_all, idx, self.offsets[i])
        return y

    def extra_repr(self) -> str:
        return (f"slots={self.lora_a.shape[0]}, max_rank={self.max_rank}, "
                f"projections={[sid for sid, _ in self.slices]}")


def write_adapter(layers: dict[str, LoRALinear], slot: int, adapter: LoRAAdapter) -> None:
    for name, layer in layers.items():
        layer.set_slot(slot, adapter.weights.get(name))
