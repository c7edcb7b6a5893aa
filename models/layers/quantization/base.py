"""QuantizationConfig: what a checkpoint's `quantization_config` says, and which linear method
each layer gets from it."""
from __future__ import annotations

from octavo.models.layers.linear import LinearBase, LinearMethodBase


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
