"""QuantizationConfig: what a checkpoint's `quantization_config` says, and which linear method
each layer gets from it."""
from __future__ import annotations

from octavo.models.layers.linear import LinearBase, LinearMethodBase


# Linear layers whose owner reads their plain weight (a router scoring in fp32, MLA's absorbed
# W_UK/W_UV): they stay unquantized unless the method can hand the owner that weight.
PLAIN_WEIGHT_CHILDREN = {"MoEBlock": ("gate", "shared_expert_gate"),
                         "MultiHeadLatentAttention": ("kv_b_proj",)}


class QuantizationConfig:
    name: str = ""

    def __init__(self, modules_to_not_convert: list[str] | None = None):
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict) -> "QuantizationConfig":
        raise NotImplementedError

    def skips(self, layer_name: str) -> bool:
        """Whether the checkpoint keeps this layer unquantized (`modules_to_not_convert`)."""
        parts = layer_name.split(".")
        return any(m in parts or layer_name.startswith(m) or f".{m}." in f".{layer_name}."
                   for m in self.modules_to_not_convert)

    def get_linear_method(self, layer_name: str, layer: LinearBase) -> LinearMethodBase | None:
        """The method for this layer, or None to keep it unquantized."""
        raise NotImplementedError

    def keeps_plain(self, owner_kind: str, child_name: str, layer_name: str) -> bool:
        """Whether the linear `child_name` of a module of kind `owner_kind` stays unquantized
        because its owner reads its plain weight (PLAIN_WEIGHT_CHILDREN)."""
        return child_name in PLAIN_WEIGHT_CHILDREN.get(owner_kind, ())

    def get_moe_method(self, layer_name: str, moe):
        """The method for a FusedMoE's stacked experts, or None to keep them as they load."""
        return None
