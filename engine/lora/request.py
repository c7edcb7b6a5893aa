"""LoRARequest: which adapter a request runs with (vLLM's shape: name, integer id, path)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRARequest:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    `lora_int_id` (> 0) identifies the adapter inside the engine: two requests with the same id
    share one loaded copy, its slot and its prefix-cache blocks."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) \
                or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_path must be the adapter's "
                             f"directory, got {self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __hash__(self) -> int:
        return hash(self.lora_int_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_int_id == other.lora_int_id
