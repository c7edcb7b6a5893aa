"""Quantized linear methods and the one place that picks them: `get_quantization_config` reads
`quantization_config` from the model's config.json (or takes LLM(quantization=...)), and
`apply_quantization` gives every linear layer of a model its method before the weights load.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from octavo.models.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from octavo.models.layers.quantization.base import PLAIN_WEIGHT_CHILDREN, QuantizationConfig

__all__ = ["QuantizationConfig", "LinearMethodBase", "UnquantizedLinearMethod", "SUPPORTED",
           "get_quantization_config", "get_quantization_method", "apply_quantization"]


def _registry() -> dict[str, type[QuantizationConfig]]:
    from octavo.models.layers.quantization.gptq_awq import AWQConfig, GPTQConfig
    from octavo.models.layers.quantization.int4 import Int4RTNConfig
    from octavo.models.layers.quantization.fp8 import Fp8Config
    from octavo.models.layers.quantization.compressed_tensors import CompressedTensorsConfig
    from octavo.models.layers.quantization.int8 import Int8W8A8Config
    return {"fp8": Fp8Config, "gptq": GPTQConfig, "awq": AWQConfig, "int4": Int4RTNConfig,
            "compressed-tensors": CompressedTensorsConfig, "int8": Int8W8A8Config}


SUPPORTED = ("gptq", "awq", "int4", "compressed-tensors", "int8", "fp8")
# methods that quantize a float checkpoint at load (the others read a quantized checkpoint)
_ON_THE_FLY = ("int4", "int8")
# methods that read their own checkpoints and quantize a float one at load otherwise
_EITHER = ("fp8",)

_PLAIN_WEIGHT_CHILDREN = PLAIN_WEIGHT_CHILDREN   # the older name


def _checkpoint_config(hf_config: Any) -> dict | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc


def get_quantization_config(hf_config: Any, quantization: str | None = None) -> QuantizationConfig | None:
    """The model's quantization, or None for a plain float model. `quantization` is the user's
    choice (LLM(quantization=...)); it must agree with the checkpoint's own when there is one."""
    ckpt = _checkpoint_config(hf_config)
    ckpt_method = str(ckpt.get("quant_method", "")).lower() if ckpt else None
    if ckpt is not None and not ckpt_method:
        raise ValueError("the checkpoint's quantization_config has no 'quant_method'")
    method = quantization.lower() if isinstance(quantization, str) else quantization
    if method is None:
        method = ckpt_method
    elif ckpt_method is not None and method != ckpt_method:
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint, which is "
                         f"quantized with {ckpt_method!r}: leave quantization unset (or pass "
                         f"{ckpt_method!r})")
    if method is None:
        return None
    if method not in SUPPORTED:
        raise ValueError(f"quantization method {method!r} is not supported; supported methods: "
                         f"{', '.join(SUPPORTED)}")
    if method not in _ON_THE_FLY + _EITHER and ckpt is None:
        raise ValueError(f"quantization={method!r} reads a {method.upper()} checkpoint, but this "
                         "one has no quantization_config in config.json; to quantize a float "
                         "checkpoint at load use quantization='int4'")
    if method in _ON_THE_FLY and ckpt is not None:
        raise ValueError(f"quantization={method!r} quantizes a float checkpoint at load, but this "
                         f"checkpoint is already quantized ({ckpt_method!r})")
    return _registry()[method].from_config(ckpt or {})


# vLLM's name for the same choice
get_quantization_method = get_quantization_config


def apply_quantization(model: nn.Module, quant_config: QuantizationConfig | None) -> None:
    """Give every linear layer of `model` its quantized method, and every FusedMoE its experts'
    method where the config has one (before the weights load)."""
    if quant_config is None:
        return
    from octavo.models.layers.fused_moe import FusedMoE
    check = getattr(quant_config, "check_module", None)   # a method may refuse a module kind
    for parent_name, parent in model.named_modules():
        if check is not None:
            check(parent_name, parent)
        if isinstance(parent, FusedMoE):
            method = quant_config.get_moe_method(parent_name, parent)
            if method is not None:
                parent.set_quant_method(method)
        kind = type(parent).__name__
        for child_name, child in parent.named_children():
            if not isinstance(child, LinearBase):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if quant_config.keeps_plain(kind, child_name, name):
                continue
            method = quant_config.get_linear_method(name, child)
            if method is not None:
                child.set_quant_method(method)
