"""GGUF weights kept quantized. Q4_0 / Q4_1 / Q4_K on the INT4 kernel: each block of 32 (Q4_K:
sub-block) is a group (Q4_1: W = q * d + m; Q4_0: W = (q - 8) * d; Q4_K: W = q * d sc - dmin m,
both exact in fp32), so the mapping is exact. Q8_0 (W = q * d), Q5_K (as Q4_K with 5-bit codes)
and Q6_K (W = (q - 32) * d sc per 16) on the weight-only INT8 kernel, as exactly; a fused layer
mixing 4-bit and other kept types (Q4_K_M's attn_v / ffn_down in Q6_K) goes INT8 too. Layers
holding any other type load dequantized, as before.

MoE experts (the stacks ffn_{gate,up,down}_exps) go on the INT4 MoE kernel with the same codes,
scales and offsets, per layer when its three stacks are all Q4_0 / Q4_1 / Q4_K (mixed among
them too). A layer with any other expert type (Q4_K_M's Q6_K down stacks, Q5_K, Q8_0, F16, ...)
keeps its experts dequantized: octavo has no weight-only INT8 MoE kernel, and the FP8 one would
round them."""
from __future__ import annotations

import torch
from torch import nn

from octavo import ops
from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param
from octavo.models.layers.quantization.int4_moe import Int4MoEMethod
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


class GGUFInt4MoEMethod(Int4MoEMethod):
    """GGUF 4-bit experts on the INT4 MoE kernel. Parameters, in Int4MoEMethod's layout: codes
    w13_qweight uint8 [E, 2I/tp, H] / w2_qweight [E, H, I/tp], and w13_ / w2_ scales and offsets
    float32 [E, N, K/32] (W = codes * scale + offset, as GGUFInt4LinearMethod holds them), each
    filled one expert and projection at a time and sliced over I on each rank as the scales are."""

    names = {"codes": "qweight", "scales": "scales"}

    def __init__(self):
        super().__init__(GGUF_GROUP)

    def to_logical(self, role, loaded, rows, cols):
        if role == "codes" and loaded.dtype != torch.uint8:
            raise ValueError(f"GGUF 4-bit expert codes must be uint8, got {loaded.dtype}")
        return loaded.float() if role == "scales" else loaded

    def create_weights(self, moe) -> None:
        super().create_weights(moe)
        for stack in ("w13", "w2"):
            scales = getattr(moe, f"{stack}_scales")
            offsets = nn.Parameter(torch.empty_like(scales), requires_grad=False)
            offsets.weight_loader = self._loader(moe, "scales")   # the scales' shape and slice
            setattr(moe, f"{stack}_offsets", offsets)

    def process_weights_after_loading(self, moe):
        """-> the packed experts (ops.MoEInt4Weights); they replace the loaded parameters."""
        def get(stack: str, name: str) -> torch.Tensor:
            return getattr(moe, f"{stack}_{name}").data
        prepared = ops.prepare_moe_int4_weights(
            get("w13", "qweight"), get("w13", "scales"), None, get("w2", "qweight"),
            get("w2", "scales"), None, GGUF_GROUP, w13_offsets=get("w13", "offsets"),
            w2_offsets=get("w2", "offsets"))
        for stack in ("w13", "w2"):
            for name in ("qweight", "scales", "offsets"):
                p = getattr(moe, f"{stack}_{name}")
                p.data = p.data.new_empty(0)
        return prepared


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

    def get_moe_method(self, layer_name: str, moe):
        """The INT4 MoE method when the layer's gate, up and down stacks are all of a 4-bit
        type; None (experts dequantized at load) otherwise, and where a rank's slice of the
        intermediate size is no whole number of 32-groups (many tensor parallel ranks)."""
        from octavo.models.gguf_loader import expert_weight_name
        names = [expert_weight_name(layer_name, p) for p in ("gate_proj", "up_proj", "down_proj")]
        types = [self.types.get(n) for n in names]
        if not all(t in self.kept_types and self.kept_types[t][0] == "int4" for t in types):
            return None
        if moe.local_size % GGUF_GROUP or moe.hidden_size % GGUF_GROUP:
            return None
        self.kept.update({n: ("int4", GGUF_GROUP) for n in names})
        return GGUFInt4MoEMethod()
