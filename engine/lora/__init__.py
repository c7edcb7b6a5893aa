"""Multi-LoRA serving: PEFT adapters in fixed device slots, applied per token by batched
shrink/expand ops (octavo.ops.lora_shrink / lora_expand) around the linear layers."""
from octavo.lora.request import LoRARequest

__all__ = ["LoRARequest"]
