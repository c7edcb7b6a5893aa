"""FP8 checkpoint writers shared by the FP8 tests: quantize a float checkpoint's linear weights in
plain PyTorch and save it in the `fp8` (AutoFP8 / DeepSeek-V3) or compressed-tensors
float-quantized layout, with a dequantized float twin for transformers to run."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from octavo import ops_native

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight(w: torch.Tensor, kind: str):
    """-> (e4m3 weight, the scale tensor as the format stores it, dequantized fp32 weight)."""
    if kind == "tensor":                       # AutoFP8 / llm-compressor: one fp32 scalar
        scale = (w.abs().amax() / 448).reshape(())
        q = ops_native.fp8_quantize(w, scale)
        return q, scale.float(), ops_native.fp8_dequantize(q, scale)
    if kind == "channel":                      # compressed-tensors strategy "channel": [N, 1]
        q, scale = ops_native.fp8_quantize_weight(w)
        return q, scale, ops_native.fp8_dequantize(q, scale)
    q, scale = ops_native.fp8_quantize_weight(w, (128, 128))   # DeepSeek-V3 weight_scale_inv
    return q, scale, ops_native.fp8_dequantize(q, scale, (128, 128))


def _act_scale(name: str) -> torch.Tensor:
    # a static input scale per projection (calibration stand-in); q/k/v and gate/up differ, so
    # loading must take the largest of a fused layer's
    return torch.tensor([0.004 + 0.001 * (sum(map(ord, name)) % 5)], dtype=torch.float32)


def quant_config(fmt, kind, activation, ignore=("lm_head",)) -> dict:
    """The config.json quantization_config of each format."""
    if fmt == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": activation or "dynamic", "fmt": "e4m3"}
        if kind == "block":
            qc["weight_block_size"] = [128, 128]
        return qc
    acts = None if activation is None else {
        "num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
        "strategy": "token" if activation == "dynamic" else "tensor",
        "dynamic": activation == "dynamic", "observer": None if activation == "dynamic" else "minmax"}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
               "strategy": kind, "dynamic": False, "observer": "minmax",
               "block_structure": [128, 128] if kind == "block" else None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": list(ignore), "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts, "output_activations": None}}}


def write_fp8(src, dst_q, dst_deq, fmt, kind, activation, linears=LINEARS):
    """`src` (a float checkpoint) as an fp8 / compressed-tensors checkpoint and its dequantized
    twin; every `<module>.weight` whose module name is in `linears` is quantized (experts one
    expert and projection at a time, as real checkpoints store them). Returns the static input
    scales of each quantized linear (for the W8A8 static reference)."""
    state = load_file(os.path.join(src, "model.safetensors"))
    qstate, deq, input_scales = {}, {}, {}
    for name, t in sorted(state.items()):
        module = name.rsplit(".", 2)
        if len(module) == 3 and module[1] in linears and module[2] == "weight":
            prefix = f"{module[0]}.{module[1]}"
            q, scale, w = quantize_weight(t, kind)
            qstate[name] = q
            # DeepSeek-V3's fp8 files name block scales weight_scale_inv; compressed-tensors
            # calls every kind weight_scale
            inv = kind == "block" and fmt == "fp8"
            qstate[prefix + (".weight_scale_inv" if inv else ".weight_scale")] = scale
            if activation == "static":
                input_scales[prefix] = qstate[prefix + ".input_scale"] = _act_scale(prefix)
            deq[name] = w
        else:
            qstate[name] = deq[name] = t
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qc = quant_config(fmt, kind, activation)
    for dst, tensors, cfg in ((dst_q, qstate, dict(config, quantization_config=qc)),
                              (dst_deq, deq, config)):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return input_scales
