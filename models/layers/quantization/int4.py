"""4-bit weight-only linear methods on the INT4 GEMM (ops.int4_gemm_prepared): the shared base
(logical [out, in] codes, [out, groups] scales and zero points, repacked once after loading) and
`quantization="int4"`, round-to-nearest with group 128 of a float checkpoint at load."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from octavo.models.layers.quantization.base import QuantizationConfig

logger = logging.getLogger(__name__)


def _param(layer: nn.Module, name: str, shape: tuple, dtype: torch.dtype, loader,
           input_dim: int | None, output_dim: int | None, optional: bool = False) -> None:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.input_dim, p.output_dim, p.weight_loader = input_dim, output_dim, loader
    p.optional, p.kind = optional, name
    layer.register_parameter(name, p)


class Int4LinearMethod(LinearMethodBase):
    """Subclasses create the checkpoint's parameters and `codes(layer)`; this class repacks
    them for the kernel and applies it. The kernel runs on CPU; elsewhere (and for act-order
    shards whose groups are not contiguous blocks) the weight is dequantized once instead."""

    def codes(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int,
                                    torch.Tensor | None]:
        """-> (codes [N, K] uint8, scales [N, G], zeros [N, G] or None (8), group_size, g_idx)."""
        raise NotImplementedError

    def offsets(self, layer) -> torch.Tensor | None:
        """[N, G] offsets W = q * scale + offset, where the format stores them (else None)."""
        return None

    def process_weights_after_loading(self, layer):
        if getattr(layer, "int4_weight", None) is not None or getattr(layer, "dequantized", None) is not None:
            return
        q, scales, zeros, group_size, g_idx = self.codes(layer)
        offsets = self.offsets(layer)
        layer.int4_weight = layer.dequantized = None
        try:
            if q.device.type == "cuda":
                if not ops.int4_cuda_supported(layer.params_dtype, q.shape[1], group_size):
                    raise ValueError("the CUDA INT4 kernel takes bf16 / fp16 activations and groups "
                                     "of whole 16-wide K steps")
            elif q.device.type != "cpu":
                raise ValueError("the INT4 kernels run on CPU and CUDA only")
            w = ops.int4_prepare(q, scales, zeros, group_size, g_idx, offsets)
            # the act-order permutation beside the codes (no host copy per call: CUDA graphs)
            layer.int4_weight = w if w.perm is None else w._replace(perm=w.perm.to(q.device))
        except ValueError as e:
            logger.debug("INT4 layer dequantized at load: %s", e)
            if offsets is not None:
                gs, _ = ops_native.int4_groups(q.shape[1], group_size)
                g = torch.arange(q.shape[1], device=q.device) // gs
                w = q.float() * scales[:, g] + offsets[:, g]
            else:
                w = ops_native.int4_dequantize(q, scales, zeros, group_size, g_idx)
            layer.dequantized = w.to(layer.params_dtype)
        for name in layer._method_params:              # the packed copy replaces the checkpoint's
            getattr(layer, name).data = torch.empty(0, device=q.device)

    def apply(self, layer, x, bias=None):
        if getattr(layer, "int4_weight", None) is None and getattr(layer, "dequantized", None) is None:
            self.process_weights_after_loading(layer)
        if layer.int4_weight is None:
            return F.linear(x, layer.dequantized, bias)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return ops.int4_gemm_prepared(x, layer.int4_weight, bias)


def quantize_rtn(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit: w [N, K] -> (codes uint8 [N, K], scales [N, G], zeros
    [N, G] float32) with (codes - zeros) * scales ~ w; each group's min and max are exact."""
    n, k = w.shape
    gs, groups = ops_native.int4_groups(k, group_size)
    wf = F.pad(w.float(), (0, groups * gs - k)).view(n, groups, gs)
    valid = (torch.arange(groups * gs, device=w.device) < k).view(groups, gs)
    lo = torch.where(valid, wf, torch.inf).amin(-1).clamp(max=0)
    hi = torch.where(valid, wf, -torch.inf).amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    zeros = -lo / scales
    q = torch.round(wf / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return q.view(n, -1)[:, :k].to(torch.uint8), scales, zeros


class Int4RTNLinearMethod(Int4LinearMethod):
    """A float weight loaded as usual, quantized once after loading."""

    def __init__(self, group_size: int = 128):
        self.group_size = group_size

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition,
                                                 output_size_per_partition, params_dtype)

    def codes(self, layer):
        q, scales, zeros = quantize_rtn(layer.weight.data, self.group_size)
        return q, scales, zeros, self.group_size, None


class Int4RTNConfig(QuantizationConfig):
    name = "int4"

    def __init__(self, group_size: int = 128):
        super().__init__()
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict) -> "Int4RTNConfig":
        return cls()

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        return Int4RTNLinearMethod(self.group_size)

    def get_moe_method(self, layer_name: str, moe):
        from octavo.models.layers.quantization.int4_moe import Int4RTNMoEMethod
        return Int4RTNMoEMethod(self.group_size)
