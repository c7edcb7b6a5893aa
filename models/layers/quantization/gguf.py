"""GGUF weights kept quantized. Q4_0 / Q4_1 / Q4_K on the INT4 kernel: each block of 32 (Q4_K:
sub-block) is a group (Q4_1: W = q * d + m; Q4_0: W = (q - 8) * d; Q4_K: W = q * d sc - dmin m,
both exact in fp32), so the mapping is exact. Q8_0 (W = q * d), Q5_K (as Q4_K with 5-bit codes)
and Q6_K (W = (q - 32) * d sc per 16) on the weight-only INT8 kernel, as exactly; a fused layer
mixing 4-bit and other kept types (Q4_K_M's attn_v / ffn_down in Q6_K) goes INT8 too. Layers
holding any other type load dequantized, as before.

MoE experts (the stacks ffn_{gate,up,down}_exps) go on the INT4 MoE kernel with the same codes,
scales and offsets, per layer when its three stacks are all Q4_0 / Q4_1 / Q4_K (mixed among
them too); on the weight-only INT8 MoE kernel when they are all of a kept type but not all
4-bit (Q8_0, Q5_K, Q6_K, and Q4_K_M's Q4_K gate / up beside its Q6_K down), each stack with its
own group size (gate and up share the smaller of theirs), as exactly. A layer with any other
expert type (F16, Q2_K, ...) keeps its experts dequantized."""
from __future__ import annotations

import torch
from torch import nn

from octavo import ops
from octavo.models.layers.linear import LinearBase
from octavo.models.layers.quantization.base import QuantizationConfig
from octavo.models.layers.quantization.int4 import Int4LinearMethod, _param
from octavo.models.layers.quantization.int4_moe import Int4MoEMethod
from octavo.models.layers.quantization.int8 import Int8WoqLinearMethod
from octavo.models.layers.quantization.int8_moe import apply_int8_experts, prepare_int8_experts

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


class GGUFInt8MoEMethod:
    """GGUF experts on the weight-only INT8 MoE kernel (ops.fused_moe_int8_prepared: CPU and
    CUDA; elsewhere dequantized once at load, int8_moe.prepare_int8_experts). Parameters:
    codes int8 w13_qweight [E, 2I/tp, H] (gate rows, then up rows) / w2_qweight [E, H, I/tp], and
    scales and offsets float32 [E, N, K/group] (W = codes * scale + offset), each filled one expert
    and projection at a time; a rank keeps its rows of gate / up and its columns (and groups) of
    down."""

    def __init__(self, group_size13: int, group_size2: int):
        self.gs = {"w13": group_size13, "w2": group_size2}

    def create_weights(self, moe) -> None:
        e, i, h = moe.num_experts, moe.local_size, moe.hidden_size
        for stack in ("w13", "w2"):     # the float stacks are not loaded: the codes replace them
            empty = nn.Parameter(torch.empty(0, dtype=getattr(moe, f"{stack}_weight").dtype),
                                 requires_grad=False)
            empty.optional = True
            setattr(moe, f"{stack}_weight", empty)
        for stack, (n, k) in (("w13", (2 * i, h)), ("w2", (h, i))):
            groups = k // self.gs[stack]
            for name, shape, dtype in (("qweight", (e, n, k), torch.int8),
                                       ("scales", (e, n, groups), torch.float32),
                                       ("offsets", (e, n, groups), torch.float32)):
                p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                p.weight_loader = self._loader(moe, stack)
                setattr(moe, f"{stack}_{name}", p)

    def _loader(self, moe, stack: str):
        def load(param, loaded, shard_id):
            expert, kind = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
            if expert is None or kind not in ("w1", "w3", "w2"):
                raise ValueError("GGUF expert tensors are read one expert and projection at a "
                                 f"time, got shard {shard_id!r}")
            if not 0 <= expert < moe.num_experts:
                raise ValueError(f"expert {expert} is out of range for {moe.num_experts} experts")
            i, rank = moe.local_size, moe.tp_rank
            if kind == "w2":            # this rank's columns of I, and their groups
                cut = param.shape[2]
                src = loaded if loaded.shape[1] == cut else loaded.narrow(1, rank * cut, cut)
                dst = param.data[expert]
            else:
                src = loaded.narrow(0, rank * i, i)
                dst = param.data[expert].narrow(0, 0 if kind == "w1" else i, i)
            if src.shape != dst.shape:
                raise ValueError(f"expert {expert} {kind}: a {list(loaded.shape)} tensor does not "
                                 f"fit {list(param.shape[1:])}")
            dst.copy_(src)
            if param.dtype == torch.int8:
                moe._loaded.add((expert, kind))
        return load

    def process_weights_after_loading(self, moe):
        """-> the packed experts (ops.MoEInt8Weights); they replace the loaded parameters."""
        def get(stack: str, name: str) -> torch.Tensor:
            return getattr(moe, f"{stack}_{name}").data
        prepared = prepare_int8_experts(
            moe, get("w13", "qweight"), get("w13", "scales"), get("w13", "offsets"),
            get("w2", "qweight"), get("w2", "scales"), get("w2", "offsets"), self.gs["w13"],
            self.gs["w2"])
        for stack in ("w13", "w2"):
            for name in ("qweight", "scales", "offsets"):
                p = getattr(moe, f"{stack}_{name}")
                p.data = p.data.new_empty(0)
        return prepared

    @staticmethod
    def apply(moe, hidden, topk_weights, topk_ids):
        return apply_int8_experts(moe, hidden, topk_weights, topk_ids)

    @staticmethod
    def apply_native(moe, hidden, topk_weights, topk_ids):
        return apply_int8_experts(moe, hidden, topk_weights, topk_ids, native=True)


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
        type, the INT8 one when they are all of a kept type otherwise; None (experts dequantized
        at load) when any is not, and where a rank's slice of the intermediate size is no whole
        number of groups (many tensor parallel ranks)."""
        from octavo.models.gguf_loader import expert_weight_name
        names = [expert_weight_name(layer_name, p) for p in ("gate_proj", "up_proj", "down_proj")]
        types = [self.types.get(n) for n in names]
        if not all(t in self.kept_types for t in types):
            return None
        kinds = [self.kept_types[t] for t in types]
        if all(family == "int4" for family, _ in kinds):
            if moe.local_size % GGUF_GROUP or moe.hidden_size % GGUF_GROUP:
                return None
            self.kept.update({n: ("int4", GGUF_GROUP) for n in names})
            return GGUFInt4MoEMethod()
        gs13, gs2 = min(kinds[0][1], kinds[1][1]), kinds[2][1]
        if moe.hidden_size % gs13 or moe.local_size % gs2:
            return None
        self.kept.update({names[0]: ("int8", gs13), names[1]: ("int8", gs13),
                          names[2]: ("int8", gs2)})
        return GGUFInt8MoEMethod(gs13, gs2)
