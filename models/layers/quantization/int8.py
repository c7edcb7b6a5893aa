"""INT8 linear methods: W8A8 (int8 weights with per-channel scales, activations quantized to
int8 per token, or with a static scale, on ops.int8_gemm_prepared) and weight-only int8 with
group scales and offsets (ops.int8_woq_gemm_prepared); GPTQ 8-bit checkpoints on the latter.

GPTQ 8-bit (AutoGPTQ / GPTQModel): qweight int32 [K/4, N] packed along K (code of row 4i+j in
bits 8j..8j+7 of row i), qzeros int32 [G, N/4] packed along N, scales [G, N], g_idx int32 [K];
W = (q - z) * s with q, z in 0..255 (checkpoint_format "gptq" stores z - 1).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from octavo import ops, ops_native
from octavo.models.layers.linear import LinearBase, LinearMethodBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import _param

logger = logging.getLogger(__name__)


def full_rows(layer: LinearBase, shard_id) -> int:
    """Rows of the checkpoint tensor that `shard_id` loads into `layer` (all of its output
    rows when there is no shard id)."""
    if shard_id is None:
        return layer.output_size
    if hasattr(layer, "_shard"):                    # QKVParallelLinear
        return layer._shard(shard_id)[3]
    return layer.output_sizes[shard_id]             # MergedColumnParallelLinear


# ---- W8A8 ------------------------------------------------------------------------------------

class Int8W8A8LinearMethod(LinearMethodBase):
    """Parameters: weight int8 [N, K], weight_scale fp32 [N, 1] (a per-tensor checkpoint scale
    is spread over its projection's rows), optional static input_scale [1] and
    input_zero_point [1] (fused projections keep the largest scale, as vLLM does)."""

    def __init__(self, asymmetric: bool = False, static: bool = False):
        self.asymmetric, self.static = asymmetric, static

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        loader = self._loader(layer)
        _param(layer, "weight", (n, k), torch.int8, loader, 1, 0)
        _param(layer, "weight_scale", (n, 1), torch.float32, loader, None, 0)
        # symmetric checkpoints may still store (zero) zero points: accepted, checked
        _param(layer, "weight_zero_point", (n, 1), torch.int32, loader, None, 0, optional=True)
        layer.weight_zero_point.data.zero_()
        if self.static:
            _param(layer, "input_scale", (1,), torch.float32, loader, None, None)
            layer.input_scale.data.zero_()
            _param(layer, "input_zero_point", (1,), torch.int32, loader, None, None,
                   optional=not self.asymmetric)
            layer.input_zero_point.data.zero_()

    def _loader(self, layer):
        def load(param, loaded, shard_id=None):
            if param.kind == "weight":
                if loaded.is_floating_point():          # naive-quantized: integer values in floats
                    loaded = loaded.round()
                if loaded.min() < -128 or loaded.max() > 127:
                    raise ValueError("an int8 weight holds values outside [-128, 127]")
                loaded = loaded.to(torch.int8)
            elif param.kind in ("weight_scale", "weight_zero_point"):
                loaded = loaded.to(param.dtype).reshape(-1, 1)
                if loaded.shape[0] == 1:                # per-tensor: one value for the projection
                    loaded = loaded.expand(full_rows(layer, shard_id), 1)
            elif param.kind == "input_scale":
                param.data.copy_(torch.maximum(param.data, loaded.float().reshape(1)))
                return None
            elif param.kind == "input_zero_point":
                zp = loaded.to(torch.int32).reshape(1)
                if getattr(param, "loaded", False) and not torch.equal(param.data, zp):
                    raise ValueError("fused projections with different static input zero points "
                                     "are not supported")
                param.data.copy_(zp)
                param.loaded = True
                return None
            layer.weight_loader(param, loaded, shard_id)
        return load

    def process_weights_after_loading(self, layer):
        if getattr(layer, "int8_weight", None) is not None:
            return
        if layer.weight_zero_point.data.any():
            raise ValueError("int8 weights with zero points (asymmetric weights) are not "
                             "supported: W8A8 needs symmetric weights")
        layer.int8_weight = ops_native.int8_prepare(layer.weight.data, layer.weight_scale.data)
        layer.int8_static = ((layer.input_scale.data.clone(),
                              layer.input_zero_point.data.clone() if self.asymmetric else None)
                             if self.static else (None, None))
        if self.static and not layer.int8_static[0].item() > 0:
            raise ValueError("a static int8 input_scale was not loaded (or is not positive)")
        if self.static and not self.asymmetric and layer.input_zero_point.data.any():
            raise ValueError("a symmetric int8 input has a nonzero input_zero_point")
        for name in layer._method_params:
            getattr(layer, name).data = torch.empty(0, device=layer.weight.device)

    def apply(self, layer, x, bias=None):
        if getattr(layer, "int8_weight", None) is None:
            self.process_weights_after_loading(layer)
        scale, zp = layer.int8_static
        impl = ops if x.device.type in ("cpu", "cuda") else ops_native
        return impl.int8_gemm_prepared(x, layer.int8_weight, bias, self.asymmetric, scale, zp)


class Int8W8A8Config(QuantizationConfig):
    """quantization="int8": a float checkpoint quantized at load, per-channel symmetric weights
    (round to nearest, scale max|w| / 127) and dynamic per-token activations."""
    name = "int8"

    @classmethod
    def from_config(cls, config: dict) -> "Int8W8A8Config":
        return cls()

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        return Int8RTNLinearMethod()


class Int8RTNLinearMethod(Int8W8A8LinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        from octavo.models.layers.linear import UnquantizedLinearMethod
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition,
                                                 output_size_per_partition, params_dtype)

    def process_weights_after_loading(self, layer):
        if getattr(layer, "int8_weight", None) is not None:
            return
        wq, scale = quantize_int8_per_channel(layer.weight.data)
        layer.int8_weight = ops_native.int8_prepare(wq, scale)
        layer.int8_static = (None, None)
        layer.weight.data = torch.empty(0, device=wq.device)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8: w [N, K] -> (codes int8 [N, K], scales fp32 [N])."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


# ---- weight-only int8 ------------------------------------------------------------------------

class Int8WoqLinearMethod(LinearMethodBase):
    """Subclasses create the checkpoint's parameters and `codes(layer)`; this class repacks
    them for the weight-only kernel once and applies it (CPU and CUDA; dequantized once at load
    elsewhere, for act order, and on CUDA for groups that are not whole 16-wide K steps)."""

    def codes(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int,
                                    torch.Tensor | None]:
        """-> (codes int8 [N, K], scales [N, G], offsets [N, G] or None, group_size, g_idx)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer):
        if getattr(layer, "int8_woq", None) is not None or getattr(layer, "dequantized", None) is not None:
            return
        q, scales, offsets, group_size, g_idx = self.codes(layer)
        layer.int8_woq = layer.dequantized = None
        perm = ops_native.int4_act_order(g_idx, q.shape[1], group_size)
        kernel = q.device.type == "cpu" or (
            q.device.type == "cuda"
            and ops.int8_woq_cuda_supported(layer.params_dtype, q.shape[1], group_size))
        if perm is not None or not kernel:
            # act-order groups are not contiguous: one dequantized weight (rare for 8 bits)
            gs, _ = ops_native.int4_groups(q.shape[1], group_size)
            g = g_idx.long() if g_idx is not None else torch.arange(q.shape[1], device=q.device) // gs
            w = q.float() * scales.float()[:, g]
            if offsets is not None:
                w = w + offsets.float()[:, g]
            logger.debug("int8 weight-only layer dequantized at load")
            layer.dequantized = w.to(layer.params_dtype)
        else:
            layer.int8_woq = ops_native.int8_woq_prepare(q, scales, offsets, group_size)
        for name in layer._method_params:
            getattr(layer, name).data = torch.empty(0, device=q.device)

    def apply(self, layer, x, bias=None):
        if getattr(layer, "int8_woq", None) is None and getattr(layer, "dequantized", None) is None:
            self.process_weights_after_loading(layer)
        if layer.int8_woq is None:
            return F.linear(x, layer.dequantized, bias)
        return ops.int8_woq_gemm_prepared(x, layer.int8_woq, bias)


_SHIFTS8 = torch.arange(0, 32, 8, dtype=torch.int32)


def unpack_rows8(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R/4, C] -> int32 [R, C] in 0..255, byte j of word r holding row 4r+j."""
    b = (packed.to(torch.int32)[:, None, :] >> _SHIFTS8.to(packed.device)[None, :, None]) & 255
    return b.reshape(-1, packed.shape[1])


def unpack_cols8(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/4] -> int32 [R, C] in 0..255, byte j of word c holding column 4c+j."""
    b = (packed.to(torch.int32)[..., None] >> _SHIFTS8.to(packed.device)) & 255
    return b.reshape(packed.shape[0], -1)


class GPTQ8LinearMethod(Int8WoqLinearMethod):
    """GPTQ 8-bit: codes as int8 (q - 128), offsets -(z - 128) * s, so W = (q - z) * s."""

    def __init__(self, config: "GPTQ8Config"):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        gs = k if self.config.group_size == -1 else self.config.group_size
        row_parallel = layer.input_size_per_partition != layer.input_size
        if row_parallel and self.config.desc_act:
            raise ValueError("GPTQ 8-bit act-order checkpoints are not supported with tensor "
                             "parallelism over their input dimension")
        if row_parallel and self.config.group_size != -1 and k % gs:
            raise ValueError(f"the input shard of {k} columns is not a whole number of GPTQ "
                             f"groups of {gs}: use fewer tensor parallel ranks")
        groups, gdim = (1, None) if self.config.group_size == -1 else (-(-k // gs), 1)
        loader = self._loader(layer)
        _param(layer, "qweight", (n, k), torch.int8, loader, 1, 0)
        _param(layer, "scales", (n, groups), torch.float32, loader, gdim, 0)
        _param(layer, "qzeros", (n, groups), torch.int32, loader, gdim, 0)
        _param(layer, "g_idx", (k,), torch.int32, loader, 0, None, optional=True)
        layer.g_idx.data.copy_(torch.arange(k, dtype=torch.int32) // gs)

    def _loader(self, layer):
        def load(param, loaded, shard_id=None):
            if param.kind == "qweight":                 # [K/4, N] -> [N, K] codes - 128
                loaded = (unpack_rows8(loaded) - 128).to(torch.int8).t()
            elif param.kind == "qzeros":                # [G, N/4] -> [N, G]; v1 stores z - 1
                z = unpack_cols8(loaded).t()
                loaded = z if self.config.v2 else (z + 1) & 255
            elif param.kind == "scales":
                loaded = loaded.float().t()
            else:
                loaded = loaded.to(torch.int32)
            layer.weight_loader(param, loaded, shard_id)
        return load

    def codes(self, layer):
        s = layer.scales.data
        offsets = -(layer.qzeros.data.float() - 128) * s
        k = layer.qweight.shape[1]
        gs = k if self.config.group_size == -1 else self.config.group_size
        # without act order g_idx is position // group_size (and a row shard's slice of it
        # holds the global group numbers): only act-order checkpoints need it
        return layer.qweight.data, s, offsets, gs, layer.g_idx.data if self.config.desc_act else None


class GPTQ8Config(QuantizationConfig):
    name = "gptq"

    def __init__(self, group_size: int, desc_act: bool, v2: bool, modules_to_not_convert=None):
        super().__init__(modules_to_not_convert)
        self.group_size, self.desc_act, self.v2 = group_size, desc_act, v2

    @classmethod
    def from_config(cls, config: dict) -> "GPTQ8Config":
        fmt = str(config.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and "
                             "'gptq_v2')")
        return cls(int(config.get("group_size", 128)), bool(config.get("desc_act", False)),
                   fmt == "gptq_v2", config.get("modules_to_not_convert"))

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        return None if self.skips(layer_name) else GPTQ8LinearMethod(self)

    def get_moe_method(self, layer_name: str, moe):
        from octavo.models.layers.quantization.int8_moe import GPTQ8MoEMethod
        return None if self.skips(layer_name) else GPTQ8MoEMethod(self)
