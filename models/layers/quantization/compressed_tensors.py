"""compressed-tensors checkpoints (llm-compressor): `config_groups` say which layers hold which
scheme; each linear layer gets the method of the first group that targets it.

  int-quantized / naive-quantized W8A8: weight int8 [N, K], weight_scale [N, 1] (or [1] per
    tensor), input activations int8 per token (dynamic) or with input_scale / input_zero_point
    -> the INT8 W8A8 kernel;
  pack-quantized W4A16 / W8A16: weight_packed int32 [N, K/(32/bits)] (value + 2^(bits-1) in
    bits b*j.. of each word, along K), weight_scale [N, G], weight_zero_point [N/(32/bits), G]
    packed along N (asymmetric only), weight_g_idx [K] (act order), weight_shape [2]
    -> the INT4 kernel (4 bits) or the weight-only INT8 kernel (8 bits);
  float (fp8) schemes -> the FP8 methods (quantization.fp8.compressed_tensors_fp8_method).
"""
from __future__ import annotations

import re

import torch

from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param
from octavo.models.layers.quantization.int8 import (Int8W8A8LinearMethod, Int8WoqLinearMethod,
                                                   full_rows)

# octavo's fused layers -> the checkpoint modules they hold (targets name those)
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, size: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 undone: int32 words along `dim` -> unsigned codes
    (value + 2^(bits-1)) as int32, `size` of them along `dim`."""
    per = 32 // bits
    p = packed.to(torch.int32)
    if dim == 0:
        p = p.t()
    shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
    codes = ((p[..., None] >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0], -1)[:, :size]
    return codes.t() if dim == 0 else codes


class _PackedMethod:
    """Parameters of pack-quantized layers in the layer's logical layout: codes [N, K] (uint8,
    unsigned), scales [N, G], zeros [N, G] (unsigned, 2^(bits-1) when symmetric), g_idx [K]."""

    def __init__(self, scheme: dict):
        w = scheme["weights"]
        self.bits = int(w["num_bits"])
        self.symmetric = bool(w.get("symmetric", True))
        self.strategy = w.get("strategy", "channel")
        self.group_size = int(w["group_size"]) if self.strategy == "group" else -1
        self.actorder = w.get("actorder") not in (None, False, "static") and self.strategy == "group"

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        gs = k if self.group_size == -1 else self.group_size
        row_parallel = layer.input_size_per_partition != layer.input_size
        if row_parallel and self.group_size != -1 and k % gs:
            raise ValueError(f"the input shard of {k} columns is not a whole number of groups of "
                             f"{gs}: use fewer tensor parallel ranks")
        if row_parallel and self.actorder:
            raise ValueError("compressed-tensors act-order layers are not supported with tensor "
                             "parallelism over their input dimension")
        groups, gdim = (1, None) if self.group_size == -1 else (-(-k // gs), 1)
        loader = self._loader(layer)
        _param(layer, "weight_packed", (n, k), torch.uint8, loader, 1, 0)
        _param(layer, "weight_scale", (n, groups), torch.float32, loader, gdim, 0)
        _param(layer, "weight_zero_point", (n, groups), torch.uint8, loader, gdim, 0,
               optional=self.symmetric)
        layer.weight_zero_point.data.fill_(1 << (self.bits - 1))
        _param(layer, "weight_g_idx", (k,), torch.int32, loader, 0, None, optional=True)
        layer.weight_g_idx.data.copy_(torch.arange(k, dtype=torch.int32) // gs)
        _param(layer, "weight_shape", (2,), torch.int64, loader, None, None, optional=True)

    def _loader(self, layer):
        def load(param, loaded, shard_id=None):
            if param.kind == "weight_shape":
                return None                             # implied by the layer
            if param.kind == "weight_packed":
                k = layer.input_size          # the full checkpoint width; the loader shards it
                loaded = unpack_int32(loaded, self.bits, 1, k).to(torch.uint8)
            elif param.kind == "weight_zero_point":
                rows = full_rows(layer, shard_id)
                if loaded.dtype == torch.int32 and loaded.shape[0] < rows:   # packed along N
                    loaded = unpack_int32(loaded, self.bits, 0, rows)
                else:                                   # unpacked signed zero points
                    loaded = loaded.to(torch.int32) + (1 << (self.bits - 1))
                loaded = loaded.reshape(rows, -1).to(torch.uint8)
            elif param.kind == "weight_scale":
                loaded = loaded.float().reshape(loaded.shape[0], -1)
            else:
                loaded = loaded.to(torch.int32)
            layer.weight_loader(param, loaded, shard_id)
        return load

    def _groups(self, layer):
        k = layer.weight_packed.shape[1]
        gs = k if self.group_size == -1 else self.group_size
        g_idx = layer.weight_g_idx.data if self.actorder else None
        return gs, g_idx


class CTW4A16LinearMethod(_PackedMethod, Int4LinearMethod):
    def codes(self, layer):
        gs, g_idx = self._groups(layer)
        return (layer.weight_packed.data, layer.weight_scale.data,
                layer.weight_zero_point.data.float(), gs, g_idx)


class CTW8A16LinearMethod(_PackedMethod, Int8WoqLinearMethod):
    def codes(self, layer):
        gs, g_idx = self._groups(layer)
        s = layer.weight_scale.data
        q = (layer.weight_packed.data.to(torch.int32) - 128).to(torch.int8)
        offsets = -(layer.weight_zero_point.data.float() - 128) * s
        return q, s, offsets, gs, g_idx


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], dict]], ignore: list[str]):
        super().__init__()
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, config: dict) -> "CompressedTensorsConfig":
        top_format = config.get("format", "int-quantized")
        groups = []
        for name, group in (config.get("config_groups") or {}).items():
            scheme = {"weights": group.get("weights"),
                      "input_activations": group.get("input_activations"),
                      "format": group.get("format") or top_format, "name": name}
            if scheme["weights"] is None:
                raise ValueError(f"compressed-tensors group {name!r} quantizes no weights; octavo "
                                 "supports weight-quantized schemes only")
            cls._check_scheme(scheme)
            groups.append((list(group.get("targets") or ["Linear"]), scheme))
        if not groups:
            raise ValueError("the compressed-tensors quantization_config has no config_groups")
        return cls(groups, list(config.get("ignore") or []))

    @staticmethod
    def _check_scheme(s: dict) -> None:
        w, a, fmt = s["weights"], s["input_activations"], s["format"]
        what = f"compressed-tensors group {s['name']!r}"
        if w.get("type", "int") == "float":
            return                                      # the FP8 methods check their own
        if fmt not in ("int-quantized", "naive-quantized", "pack-quantized"):
            raise ValueError(f"{what}: format {fmt!r} is not supported for int weights "
                             "(int-quantized, naive-quantized, pack-quantized are)")
        bits, strategy = int(w["num_bits"]), w.get("strategy", "channel")
        if a is not None:
            if not (bits == 8 and a.get("type", "int") == "int" and int(a["num_bits"]) == 8):
                raise ValueError(f"{what}: int weights with {a.get('num_bits')}-bit "
                                 f"{a.get('type')} activations are not supported (W8A8 int8 is)")
            if not w.get("symmetric", True) or strategy not in ("channel", "tensor"):
                raise ValueError(f"{what}: W8A8 needs symmetric per-channel or per-tensor weight "
                                 f"scales, got symmetric={w.get('symmetric')} strategy={strategy!r}")
            if a.get("strategy", "token") not in ("token", "tensor") or (
                    a.get("dynamic") and a.get("strategy", "token") != "token"):
                raise ValueError(f"{what}: activations must be dynamic per token or static per "
                                 f"tensor, got strategy={a.get('strategy')!r} dynamic={a.get('dynamic')}")
            return
        if fmt != "pack-quantized" or bits not in (4, 8):
            raise ValueError(f"{what}: weight-only int schemes are supported as pack-quantized "
                             f"4 or 8 bits, got {fmt!r} with {bits} bits")
        if strategy not in ("group", "channel"):
            raise ValueError(f"{what}: weight strategy {strategy!r} is not supported (group, "
                             "channel are)")

    def _scheme(self, layer_name: str) -> dict | None:
        prefix, _, last = layer_name.rpartition(".")
        names = [f"{prefix}.{s}" if prefix else s for s in _FUSED.get(last, (last,))]
        if all(any(_matches(p, n) for p in self.ignore) for n in names):
            return None
        if any(any(_matches(p, n) for p in self.ignore) for n in names):
            raise ValueError(f"{layer_name}: some of its fused projections are ignored by the "
                             "compressed-tensors config and some are not; octavo needs them alike")
        for targets, scheme in self.groups:
            if any(t in ("Linear", "nn.Linear") or _matches(t, n) for t in targets for n in names):
                return scheme
        return None

    def keeps_plain(self, owner_kind: str, child_name: str, layer_name: str) -> bool:
        # MLA dequantizes an fp8 kv_b_proj once for its absorbed halves (quantization.fp8)
        if owner_kind == "MultiHeadLatentAttention":
            s = self._scheme(layer_name)
            if s is not None and s["weights"].get("type", "int") == "float":
                return False
        return super().keeps_plain(owner_kind, child_name, layer_name)

    def get_moe_method(self, layer_name: str, moe):
        # the experts' checkpoint modules are <layer_name>.<e>.gate_proj / up_proj / down_proj
        schemes = [self._scheme(f"{layer_name}.0.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
        if all(s is None for s in schemes):
            return None
        if any(s is not schemes[0] for s in schemes):
            raise ValueError(f"{layer_name}: the experts' projections have different "
                             "compressed-tensors schemes; octavo needs one scheme for all of them")
        w = schemes[0]["weights"]
        if w.get("type", "int") != "float":
            if (schemes[0]["format"] == "pack-quantized" and int(w["num_bits"]) == 4
                    and schemes[0]["input_activations"] is None):
                from octavo.models.layers.quantization.int4_moe import CTW4A16MoEMethod
                return CTW4A16MoEMethod(schemes[0])
            raise ValueError(f"{layer_name}: compressed-tensors int-quantized MoE experts are "
                             "supported as pack-quantized 4-bit weights (W4A16) only")
        from octavo.models.layers.quantization.fp8 import compressed_tensors_fp8_moe_method
        return compressed_tensors_fp8_moe_method(schemes[0])

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        s = self._scheme(layer_name)
        if s is None:
            return None
        w, a = s["weights"], s["input_activations"]
        if w.get("type", "int") == "float":
            try:
                from octavo.models.layers.quantization.fp8 import compressed_tensors_fp8_method
            except ImportError:
                raise ValueError("compressed-tensors fp8 schemes are not supported yet") from None
            return compressed_tensors_fp8_method(s, layer_name, layer)
        if a is not None:
            return Int8W8A8LinearMethod(asymmetric=not a.get("symmetric", True),
                                        static=not a.get("dynamic", True))
        return CTW4A16LinearMethod(s) if int(w["num_bits"]) == 4 else CTW8A16LinearMethod(s)
