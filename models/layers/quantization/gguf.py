"""GGUF weights kept quantized. Q4_0 / Q4_1 / Q4_K on the INT4 kernel: each block of 32 (Q4_K:
sub-block) is a group (Q4_1: W = q * d + m; Q4_0: W = (q - 8) * d; Q4_K: W = q * d sc - dmin m,
both exact in fp32), so the mapping is exact. Q8_0 (W = q * d), Q5_K (as Q4_K with 5-bit codes)
and Q6_K (W = (q - 32) * d sc per 16) on the weight-only INT8 kernel, as exactly; a fused layer
mixing 4-bit and other kept types (Q4_K_M's attn_v / ffn_down in Q6_K) goes INT8 too. Layers
holding any other type load dequantized, as before."""
from __future__ import annotations

import torch

from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param
from octavo.models.layers.quantization.int8 import Int8WoqLinearMethod

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


class GGUFInt8LinearMethod(Int8WoqLinearMethod):
    """Parameters: codes [N, K] int8, scales and offsets [N, K/group_size] fp32."""

    def __init__(self, group_size: int):
        self.group_size = group_size

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n, gs = input_size_per_partition, output_size_per_partition, self.group_size
        if k % GGUF_GROUP:
            raise ValueError(f"a GGUF quantized layer needs an input size that is a multiple of "
                             f"32, got {k}")
        _param(layer, "qweight", (n, k), torch.int8, layer.weight_loader, 1, 0)
        _param(layer, "scales", (n, k // gs), torch.float32, layer.weight_loader, 1, 0)
        _param(layer, "offsets", (n, k // gs), torch.float32, layer.weight_loader, 1, 0)

    def codes(self, layer):
        return layer.qweight.data, layer.scales.data, layer.offsets.data, self.group_size, None


class GGUFConfig(QuantizationConfig):
    """Built from the file: `q4_names` maps the HF names of its kept-type weights to their ggml
    type (gguf_loader.q4_weight_names); a linear layer stays quantized when every checkpoint
    weight it holds (q, k and v for qkv_proj) is of a kept type. `kept` tells the loader how to
    hand each one over: HF name -> (kernel family, group size)."""
    name = "gguf"

    def __init__(self, q4_names: dict[str, int], packed_modules_mapping: dict):
        super().__init__()
        from octavo.models.gguf_loader import KEPT_TYPES
        if not isinstance(q4_names, dict):          # a set of Q4_0 / Q4_1 names
            q4_names = {n: 2 for n in q4_names}
        self.types, self.kept_types = q4_names, KEPT_TYPES
        self.sources: dict[str, list[str]] = {}
        for src, (target, _) in packed_modules_mapping.items():
            self.sources.setdefault(target, []).append(src)
        self.kept: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_config(cls, config: dict) -> "GGUFConfig":
        raise ValueError("GGUF quantization is read from the .gguf file itself")

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        prefix, _, last = layer_name.rpartition(".")
        srcs = self.sources.get(last, [last])
        names = [f"{prefix}.{s}.weight" if prefix else f"{s}.weight" for s in srcs]
        if not all(n in self.types for n in names):
            return None
        kinds = [self.kept_types[self.types[n]] for n in names]
        if all(family == "int4" for family, _ in kinds):
            spec, method = ("int4", GGUF_GROUP), GGUFInt4LinearMethod()
        else:
            gs = min(g for _, g in kinds)
            spec, method = ("int8", gs), GGUFInt8LinearMethod(gs)
        self.kept.update({n: spec for n in names})
        return method
