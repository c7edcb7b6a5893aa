"""FP8 (E4M3) linear methods on ops.fp8_gemm: `fp8` checkpoints (per-tensor `weight_scale` /
`input_scale`, or DeepSeek-V3 block-wise `weight_scale_inv` with `weight_block_size`),
compressed-tensors FP8 schemes (float-quantized weights; W8A16, W8A8 dynamic or static), and
`quantization="fp8"`, which quantizes a float checkpoint per output channel at load (vLLM's
dynamic fp8: activations quantized per token at run time).

Every parameter is kept in the layer's [out, in] layout so that its own weight_loader shards it
for tensor parallelism and places fused projections (qkv, gate_up): the e4m3 weight [N, K] as
stored, and fp32 scales [N, K-blocks] with one row per output (a projection's per-tensor scale is
repeated over its rows, a 128 x 128 block scale over its 128 rows), so fused projections keep
their own scales exactly, whatever their sizes.
"""
from __future__ import annotations

import torch
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from octavo.models.layers.quantization.base import QuantizationConfig

ACTIVATIONS = (None, "dynamic", "static")   # W8A16, W8A8 per-token at run time, W8A8 static


def _projection_rows(layer: LinearBase, shard_id) -> int:
    """Output rows of the checkpoint tensor that loads into `layer` with this shard_id."""
    if shard_id is None:
        return layer.output_size
    if hasattr(layer, "output_sizes"):                              # gate_up
        return layer.output_sizes[shard_id]
    if shard_id == "q":
        return layer.total_num_heads * layer.head_size
    return layer.total_num_kv_heads * layer.head_size               # k, v


class Fp8LinearMethod(LinearMethodBase):
    """An e4m3 weight with per-tensor, per-channel or block scales (`scale_kind`), stored under
    the checkpoint's names (`scale_name`: weight_scale or weight_scale_inv)."""

    def __init__(self, scale_kind: str, scale_name: str = "weight_scale",
                 block: tuple[int, int] | None = None, activation: str | None = None):
        if scale_kind not in ("tensor", "channel", "block"):
            raise ValueError(f"fp8 scale kind must be tensor, channel or block, got {scale_kind!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"fp8 activation scheme must be one of {ACTIVATIONS}, got {activation!r}")
        self.scale_kind, self.scale_name, self.block, self.activation = (
            scale_kind, scale_name, block, activation)

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        k, n = input_size_per_partition, output_size_per_partition
        w = nn.Parameter(torch.empty(n, k, dtype=torch.float8_e4m3fn), requires_grad=False)
        w.input_dim, w.output_dim, w.weight_loader = 1, 0, layer.weight_loader
        layer.register_parameter("weight", w)
        if self.scale_kind == "block":
            bn, bk = self.block
            if k != layer.input_size and k % bk:
                raise ValueError(f"the input shard of {k} columns is not a whole number of fp8 "
                                 f"blocks of {bk}: use fewer tensor parallel ranks")
            self.block_k = bk
            s = nn.Parameter(torch.empty(n, -(-k // bk), dtype=torch.float32), requires_grad=False)
            s.input_dim = 1
        else:
            self.block_k = max(k, 1)
            s = nn.Parameter(torch.empty(n, 1, dtype=torch.float32), requires_grad=False)
            s.input_dim = None
        s.output_dim, s.weight_loader = 0, self._scale_loader(layer)
        layer.register_parameter(self.scale_name, s)
        if self.activation == "static":
            a = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            a.input_dim = a.output_dim = None
            a.weight_loader = self._input_scale_loader
            layer.register_parameter("input_scale", a)

    def _scale_loader(self, layer):
        def load(param, loaded, shard_id=None):
            rows = _projection_rows(layer, shard_id)
            s = loaded.float()
            if self.scale_kind == "tensor":
                if s.numel() != 1:
                    raise ValueError(f"a per-tensor fp8 scale must hold one value, got {list(s.shape)}")
                s = s.reshape(1, 1).expand(rows, 1)
            elif self.scale_kind == "channel":
                if s.numel() != rows:
                    raise ValueError(f"a per-channel fp8 scale must hold {rows} values, got {list(s.shape)}")
                s = s.reshape(rows, 1)
            else:                                   # [ceil(rows/bn), Kb] -> one row per output
                bn = self.block[0]
                if s.dim() != 2 or s.shape[0] != -(-rows // bn):
                    raise ValueError(f"fp8 block scales for {rows} rows in blocks of {bn} must have "
                                     f"{-(-rows // bn)} rows, got {list(s.shape)}")
                s = s.repeat_interleave(bn, 0)[:rows]
            layer.weight_loader(param, s.contiguous(), shard_id)
        return load

    @staticmethod
    def _input_scale_loader(param, loaded, shard_id=None):
        # fused projections share one input, so one static scale: the largest of theirs (vLLM)
        param.data.copy_(torch.maximum(param.data, loaded.float().reshape(1)))

    def process_weights_after_loading(self, layer):
        layer.fp8_weight = layer.weight.data
        layer.fp8_scale = getattr(layer, self.scale_name).data
        layer.fp8_block_k = self.block_k

    def apply(self, layer, x, bias=None):
        if getattr(layer, "fp8_weight", None) is None:
            self.process_weights_after_loading(layer)
        act = {None: None, "dynamic": "dynamic"}.get(self.activation, getattr(layer, "input_scale", None))
        return fp8_apply(layer, x, bias, act)


def fp8_apply(layer, x, bias, act):
    return ops.fp8_gemm(x, layer.fp8_weight, layer.fp8_scale, (1, layer.fp8_block_k), bias, act)


class Fp8OnlineLinearMethod(LinearMethodBase):
    """quantization="fp8": a float weight loaded as usual, quantized once per output channel."""

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition, params_dtype):
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition,
                                                 output_size_per_partition, params_dtype)

    def process_weights_after_loading(self, layer):
        if getattr(layer, "fp8_weight", None) is not None:
            return
        layer.fp8_weight, layer.fp8_scale = ops_native.fp8_quantize_weight(layer.weight.data)
        layer.fp8_block_k = max(layer.fp8_weight.shape[1], 1)
        layer.weight.data = torch.empty(0, device=layer.fp8_weight.device)  # the fp8 copy replaces it

    def apply(self, layer, x, bias=None):
        self.process_weights_after_loading(layer)
        return fp8_apply(layer, x, bias, "dynamic")


class Fp8Config(QuantizationConfig):
    """quant_method "fp8": activation_scheme "dynamic" | "static", optional weight_block_size
    (DeepSeek-V3: [128, 128] with weight_scale_inv), modules_to_not_convert / ignored_layers."""
    name = "fp8"

    def __init__(self, block: tuple[int, int] | None = None, activation: str | None = "dynamic",
                 modules_to_not_convert=None, online: bool = False):
        super().__init__(modules_to_not_convert)
        self.block, self.activation, self.online = block, activation, online

    @classmethod
    def from_config(cls, config: dict) -> "Fp8Config":
        if not config:                  # quantization="fp8" on a float checkpoint
            return cls(online=True)
        fmt = str(config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"fp8 checkpoints in format {fmt!r} are not supported (only 'e4m3')")
        scheme = str(config.get("activation_scheme", "dynamic")).lower()
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported (only 'dynamic' "
                             "and 'static')")
        block = config.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or min(block) <= 0:
                raise ValueError(f"fp8 weight_block_size must be two positive sizes, got {block}")
            if scheme == "static":
                raise ValueError("fp8 block-wise weights need activation_scheme 'dynamic'")
            block = (int(block[0]), int(block[1]))
        skip = (config.get("modules_to_not_convert") or []) + (config.get("ignored_layers") or [])
        return cls(block, scheme, skip)

    def check_module(self, name: str, module: nn.Module) -> None:
        """fp8 checkpoints whose fused-MoE experts or plain-weight linears (MLA's kv_b_proj) are
        fp8 would load as unscaled codes: refuse them until those layers take fp8 weights."""
        from octavo.models.layers.quantization import _PLAIN_WEIGHT_CHILDREN
        if self.online or self.skips(name):
            return
        kind = type(module).__name__
        plain = [c for c in _PLAIN_WEIGHT_CHILDREN.get(kind, ()) if kind != "MoEBlock"   # routers
                 and isinstance(getattr(module, c, None), LinearBase)]
        if kind == "FusedMoE" or plain:
            what = "fused MoE experts" if kind == "FusedMoE" else f"{kind}'s {', '.join(plain)}"
            raise ValueError(f"fp8 checkpoint: {name} ({what}) would need fp8 weights octavo does "
                             "not run yet; supported: fp8 / compressed-tensors FP8 checkpoints "
                             "whose quantized layers are the attention and dense MLP linears "
                             "(list the others in modules_to_not_convert / ignore)")

    def get_linear_method(self, layer_name: str, layer: LinearBase):
        if self.skips(layer_name):
            return None
        if self.online:
            return Fp8OnlineLinearMethod()
        if self.block is not None:
            # DeepSeek-V3 quantizes activations per token and 128-channel group on GPUs; on the
            # CPU kernel the weight-only form is used (no fp8 arithmetic to gain from it)
            return Fp8LinearMethod("block", "weight_scale_inv", self.block, None)
        return Fp8LinearMethod("tensor", "weight_scale", None, self.activation)


# ---- compressed-tensors (llm-compressor) float-quantized schemes ------------------------------

def compressed_tensors_fp8_method(scheme: dict, layer_name: str = "",
                                  layer: LinearBase | None = None) -> Fp8LinearMethod:
    """The method for one compressed-tensors scheme (weights, input_activations) of 8-bit float
    weights (quantization.compressed_tensors picks the scheme); ValueError naming what is
    supported for anything else."""
    weights, input_activations = scheme["weights"], scheme.get("input_activations")
    supported = ("FP8 weights with strategy tensor, channel or block (W8A16), with activations "
                 "per token (dynamic) or per tensor (static)")
    strategy = str(weights.get("strategy", "tensor")).lower()
    if weights.get("num_bits") != 8 or not weights.get("symmetric", True) or weights.get("dynamic"):
        raise ValueError(f"compressed-tensors float weights {weights} are not supported; "
                         f"supported: {supported}")
    block = None
    if strategy == "block":
        block = tuple(int(b) for b in weights.get("block_structure") or (128, 128))
        if len(block) != 2:
            raise ValueError(f"compressed-tensors block_structure must be [rows, cols], got {block}")
    elif strategy not in ("tensor", "channel"):
        raise ValueError(f"compressed-tensors FP8 weight strategy {strategy!r} is not supported; "
                         f"supported: {supported}")
    activation = None
    if input_activations:
        a_type = str(input_activations.get("type", "float")).lower()
        a_strategy = str(input_activations.get("strategy", "tensor")).lower()
        dynamic = bool(input_activations.get("dynamic", False))
        if a_type != "float" or input_activations.get("num_bits") != 8:
            raise ValueError(f"compressed-tensors FP8 weights with activations {input_activations} "
                             f"are not supported; supported: {supported}")
        if dynamic and a_strategy in ("token", "tensor", "group"):
            # group (per token and 128 columns, block checkpoints): per token here, see Fp8Config
            activation = None if block is not None else "dynamic"
        elif not dynamic and a_strategy == "tensor":
            activation = "static"
        else:
            raise ValueError(f"compressed-tensors FP8 activations {input_activations} are not "
                             f"supported; supported: {supported}")
    return Fp8LinearMethod(strategy, "weight_scale", block, activation)
