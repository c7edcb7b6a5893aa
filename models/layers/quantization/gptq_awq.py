"""GPTQ and AWQ (GEMM) 4-bit checkpoints on the INT4 kernel. Each checkpoint tensor is unpacked
on load into the layer's logical layout (codes [out, in], scales / zeros [out, groups], g_idx
[in]) and handed to the layer's own weight_loader, which shards it for tensor parallelism and
places fused projections (qkv, gate_up) exactly as it does a float weight.

GPTQ (AutoGPTQ / GPTQModel / optimum): qweight int32 [K/8, N] packed along K (code of row 8i+j in
bits 4j..4j+3 of row i), qzeros int32 [G, N/8] packed along N, scales [G, N], g_idx int32 [K].
checkpoint_format "gptq" (v1, the default) stores each zero point minus one; "gptq_v2" as is.
AWQ (AutoAWQ, version "gemm"): qweight int32 [K, N/8] and qzeros int32 [G, N/8] packed along N in
the interleaved nibble order 0 2 4 6 1 3 5 7, scales [G, N]; zero points stored as is.
"""
from __future__ import annotations

import torch

from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# nibble i of an AWQ word holds column _AWQ_ORDER[i] of its 8; _AWQ_REVERSE undoes it
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 [R, C], code of column 8c+j in bits 4j of word c (GPTQ qzeros)."""
    nib = (packed.to(torch.int32)[..., None] >> _SHIFTS.to(packed.device)) & 15
    return nib.reshape(packed.shape[0], -1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> uint8 [R, C], code of row 8r+j in bits 4j of word r (GPTQ qweight)."""
    nib = (packed.to(torch.int32)[:, None, :] >> _SHIFTS.to(packed.device)[None, :, None]) & 15
    return nib.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ's interleaved order -> uint8 [R, C]."""
    nib = unpack_cols(packed).view(packed.shape[0], -1, 8)
    return nib[..., list(_AWQ_REVERSE)].reshape(packed.shape[0], -1)


def _check_bits(method: str, config: dict) -> int:
    bits = config.get("bits", config.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"{method} with {bits}-bit weights is not supported: octavo runs 4-bit "
                         f"{method} checkpoints only")
    return bits


class _PackedInt4Method(Int4LinearMethod):
    """Parameters: codes [N, K] uint8, scales [N, G], zeros [N, G] uint8, g_idx [K] int32."""

    def __init__(self, config: "GPTQConfig | AWQConfig"):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        gs = k if self.config.group_size == -1 else self.config.group_size
        row_parallel = layer.input_size_per_partition != layer.input_size
        # act-order shards of a row-parallel layer keep every group's scales (vLLM does too)
        full_groups = row_parallel and self.config.desc_act
        if row_parallel and self.config.group_size != -1 and k % gs and not full_groups:
            raise ValueError(f"the input shard of {k} columns is not a whole number of "
                             f"{self.config.name} groups of {gs}: use fewer tensor parallel ranks")
        if self.config.group_size == -1:
            groups, gdim = 1, None
        elif full_groups:
            groups, gdim = -(-layer.input_size // gs), None
        else:
            groups, gdim = -(-k // gs), 1
        loader = self._loader(layer)
        _param(layer, "qweight", (n, k), torch.uint8, loader, 1, 0)
        _param(layer, "scales", (n, groups), torch.float32, loader, gdim, 0)
        _param(layer, "qzeros", (n, groups), torch.uint8, loader, gdim, 0)
        if self.config.name == "gptq":
            _param(layer, "g_idx", (k,), torch.int32, loader, 0, None, optional=True)
            layer.g_idx.data.copy_(torch.arange(k, dtype=torch.int32) // gs)

    def _loader(self, layer):
        def load(param, loaded, shard_id=None):
            logical = self.to_logical(param, loaded)
            if param.kind == "g_idx" and shard_id is not None:
                # fused projections share their input and so GPTQ's act order: one g_idx
                seen = getattr(param, "shards_seen", set())
                if seen and not torch.equal(param.data, _shard_g_idx(layer, param, logical)):
                    raise ValueError("the fused projections' act-order g_idx differ; octavo "
                                     "needs them equal (as GPTQ writes them)")
                param.shards_seen = seen | {shard_id}
            layer.weight_loader(param, logical, shard_id)
        return load

    def to_logical(self, param, loaded: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, layer):
        zeros = layer.qzeros.data.float()
        # without desc_act g_idx is position // group_size of the full K: a row shard's is off
        # by its first group, and the plain order needs no g_idx (vLLM ignores it too)
        g_idx = getattr(layer, "g_idx", None) if self.config.desc_act else None
        gs = layer.qweight.shape[1] if self.config.group_size == -1 else self.config.group_size
        if g_idx is not None and layer.scales.shape[1] != -(-layer.qweight.shape[1] // gs):
            gs = layer.qweight.shape[1]      # whole-layer groups on a row shard: g_idx decides
        return (layer.qweight.data, layer.scales.data, zeros, gs,
                g_idx.data if g_idx is not None else None)


def _shard_g_idx(layer, param, g_idx: torch.Tensor) -> torch.Tensor:
    # the part of a checkpoint g_idx this rank's parameter holds
    if param.input_dim is None or g_idx.shape == param.shape:
        return g_idx
    size = param.shape[0]
    return g_idx.narrow(0, layer.tp_rank * size, size)


class GPTQLinearMethod(_PackedInt4Method):
    def to_logical(self, param, loaded):
        if param.kind == "g_idx":
            return loaded.to(torch.int32)
        if param.kind == "qweight":             # [K/8, N] -> [N, K]
            return unpack_rows(loaded).t()
        if param.kind == "qzeros":              # [G, N/8] -> [N, G]; v1 stores zero - 1
            z = unpack_cols(loaded).t()
            return z if self.config.v2 else ((z.to(torch.int32) + 1) & 15).to(torch.uint8)
        return loaded.t()                       # scales [G, N] -> [N, G]


class AWQLinearMethod(_PackedInt4Method):
    def to_logical(self, param, loaded):
        if param.kind in ("qweight", "qzeros"):
            return unpack_awq(loaded).t()       # qweight [K, N/8] / qzeros [G, N/8] -> [N, *]
        return loaded.t()                       # scales [G, N] -> [N, G]


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, group_size: int, desc_act: bool, sym: bool, v2: bool,
                 modules_to_not_convert=None):
        super().__init__(modules_to_not_convert)
        self.group_size, self.desc_act, self.sym, self.v2 = group_size, desc_act, sym, v2

    @classmethod
    def from_config(cls, config: dict) -> "GPTQConfig":
        if config.get("bits") == 8:           # 8-bit GPTQ: the weight-only INT8 kernel
            from octavo.models.layers.quantization.int8 import GPTQ8Config
            return GPTQ8Config.from_config(config)
        _check_bits("GPTQ", config)
        fmt = str(config.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and "
                             "'gptq_v2')")
        return cls(int(config.get("group_size", 128)), bool(config.get("desc_act", False)),
                   bool(config.get("sym", True)), fmt == "gptq_v2",
                   config.get("modules_to_not_convert"))

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        return None if self.skips(layer_name) else GPTQLinearMethod(self)

    def get_moe_method(self, layer_name: str, moe):
        from octavo.models.layers.quantization.int4_moe import gptq_moe_method
        return None if self.skips(layer_name) else gptq_moe_method(self)


class AWQConfig(QuantizationConfig):
    name = "awq"
    desc_act = False

    def __init__(self, group_size: int, modules_to_not_convert=None):
        super().__init__(modules_to_not_convert)
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict) -> "AWQConfig":
        _check_bits("AWQ", config)
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm')")
        if not config.get("zero_point", True):
            raise ValueError("AWQ without zero points is not supported (zero_point must be true)")
        return cls(int(config.get("group_size", config.get("q_group_size", 128))),
                   config.get("modules_to_not_convert"))

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        return None if self.skips(layer_name) else AWQLinearMethod(self)

    def get_moe_method(self, layer_name: str, moe):
        from octavo.models.layers.quantization.int4_moe import awq_moe_method
        return None if self.skips(layer_name) else awq_moe_method(self)
