"""GGUF Q4_0 / Q4_1 weights kept in 4 bits on the INT4 kernel: each block of 32 is a group
(Q4_1: W = q * d + m; Q4_0: W = (q - 8) * d), so the mapping is exact. Layers whose file
tensors are of any other type load dequantized, as before."""
from __future__ import annotations

import torch

from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param

Q4_TYPES = (2, 3)   # GGMLQuantizationType Q4_0, Q4_1
GGUF_GROUP = 32


class GGUFInt4LinearMethod(Int4LinearMethod):
    """Parameters: codes [N, K] uint8, scales (d) and offsets (m, or -8 d) [N, K/32] fp32, in
    the layer's [out, in] layout, so the layer's own weight_loader shards and fuses them."""

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        if k % GGUF_GROUP:
            raise ValueError(f"a GGUF 4-bit layer needs an input size that is a multiple of 32, got {k}")
        _param(layer, "qweight", (n, k), torch.uint8, layer.weight_loader, 1, 0)
        _param(layer, "scales", (n, k // GGUF_GROUP), torch.float32, layer.weight_loader, 1, 0)
        _param(layer, "offsets", (n, k // GGUF_GROUP), torch.float32, layer.weight_loader, 1, 0)

    def codes(self, layer):
        return layer.qweight.data, layer.scales.data, None, GGUF_GROUP, None

    def offsets(self, layer):
        return layer.offsets.data


class GGUFConfig(QuantizationConfig):
    """Built from the file: `q4_names` are the HF names of its Q4_0 / Q4_1 weights; a linear
    layer goes 4-bit when every checkpoint weight it holds (q, k and v for qkv_proj) is one."""
    name = "gguf"

    def __init__(self, q4_names: set[str], packed_modules_mapping: dict):
        super().__init__()
        self.q4_names = q4_names
        self.sources: dict[str, list[str]] = {}
        for src, (target, _) in packed_modules_mapping.items():
            self.sources.setdefault(target, []).append(src)
        self.kept: set[str] = set()     # HF weight names the loader must hand over as codes

    @classmethod
    def from_config(cls, config: dict) -> "GGUFConfig":
        raise ValueError("GGUF quantization is read from the .gguf file itself")

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        prefix, _, last = layer_name.rpartition(".")
        srcs = self.sources.get(last, [last])
        names = [f"{prefix}.{s}.weight" if prefix else f"{s}.weight" for s in srcs]
        if not all(n in self.q4_names for n in names):
            return None
        self.kept.update(names)
        return GGUFInt4LinearMethod()
