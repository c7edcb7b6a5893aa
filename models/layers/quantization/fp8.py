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

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The fp32 weight [N, K] (for an owner that absorbs it: MLA's kv_b_proj)."""
        return ops_native.fp8_dequantize(layer.weight.data, getattr(layer, self.scale_name).data,
                                         (1, self.block_k))


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


class Fp8MoEMethod:
    """FusedMoE experts kept in e4m3: w13_weight [E, 2I, H] and w2_weight [E, H, I] as stored,
    with fp32 scales under the checkpoint's name (w13_<scale_name> [E, 2I, K-blocks of H],
    w2_<scale_name> [E, H, K-blocks of I]), one row per output as Fp8LinearMethod keeps them, so
    gate and up keep their own per-tensor scales and a rank's slice of I keeps its blocks.
    Activations stay in the model's dtype (W8A16): a checkpoint's expert input_scale is not used."""

    def __init__(self, scale_kind: str, scale_name: str = "weight_scale",
                 block: tuple[int, int] | None = None):
        if scale_kind not in ("tensor", "channel", "block"):
            raise ValueError(f"fp8 scale kind must be tensor, channel or block, got {scale_kind!r}")
        self.scale_kind, self.scale_name, self.block = scale_kind, scale_name, block

    def create_weights(self, moe) -> None:
        e, i, h = moe.num_experts, moe.local_size, moe.hidden_size
        if self.block is not None and moe.tp_size > 1 and i % self.block[1]:
            raise ValueError(f"the experts' intermediate shard of {i} columns is not a whole "
                             f"number of fp8 blocks of {self.block[1]}: use fewer tensor parallel ranks")
        self.bk13 = self.block[1] if self.block else max(h, 1)
        self.bk2 = self.block[1] if self.block else max(i, 1)
        for name, shape, bk in (("w13", (e, 2 * i, h), self.bk13), ("w2", (e, h, i), self.bk2)):
            w = nn.Parameter(torch.empty(shape, dtype=torch.float8_e4m3fn), requires_grad=False)
            w.weight_loader = moe.weight_loader
            setattr(moe, f"{name}_weight", w)
            s = nn.Parameter(torch.empty(*shape[:2], -(-shape[2] // bk), dtype=torch.float32),
                             requires_grad=False)
            s.weight_loader = self._scale_loader(moe)
            setattr(moe, f"{name}_{self.scale_name}", s)

    def _scale_loader(self, moe):
        def load(param, loaded, shard_id):
            expert, kind = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
            if expert is None or kind not in ("w1", "w3", "w2"):
                raise ValueError(f"fp8 expert scales are read one expert and projection at a time "
                                 f"(experts.<e>.<proj>.{self.scale_name}), got shard {shard_id!r}")
            if not 0 <= expert < moe.num_experts:
                raise ValueError(f"expert {expert} is out of range for {moe.num_experts} experts")
            i_full, i, h = moe.intermediate_size, moe.local_size, moe.hidden_size
            rows, cols = (h, i_full) if kind == "w2" else (i_full, h)
            s = self._row_scales(loaded.float(), rows, cols)
            if kind == "w2":            # this rank's K-blocks of I (all of them for one scale)
                if s.shape[1] > 1:
                    s = s.narrow(1, moe.tp_rank * i // self.bk2, param.shape[2])
                param.data[expert].copy_(s)
            else:
                s = s.narrow(0, moe.tp_rank * i, i)
                param.data[expert].narrow(0, 0 if kind == "w1" else i, i).copy_(s)
        return load

    def _row_scales(self, s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One projection's scales as stored -> [rows, K-blocks]."""
        if self.scale_kind == "tensor" or (self.scale_kind == "channel" and s.numel() == 1):
            if s.numel() != 1:
                raise ValueError(f"a per-tensor fp8 scale must hold one value, got {list(s.shape)}")
            return s.reshape(1, 1).expand(rows, 1)
        if self.scale_kind == "channel":
            if s.numel() != rows:
                raise ValueError(f"a per-channel fp8 scale must hold {rows} values, got {list(s.shape)}")
            return s.reshape(rows, 1)
        bn, bk = self.block
        grid = (-(-rows // bn), -(-cols // bk))
        if tuple(s.shape) != grid:
            raise ValueError(f"fp8 block scales of a [{rows}, {cols}] expert weight in {bn} x {bk} "
                             f"blocks must be {list(grid)}, got {list(s.shape)}")
        return s.repeat_interleave(bn, 0)[:rows]

    def scales(self, moe) -> tuple[torch.Tensor, torch.Tensor]:
        return (getattr(moe, f"w13_{self.scale_name}").data, getattr(moe, f"w2_{self.scale_name}").data)

    def block_size(self):
        return (1, self.bk13) if self.block is not None else None

    def process_weights_after_loading(self, moe):
        """-> the prepared weights; the kernel's packed copy replaces the plain one."""
        s13, s2 = self.scales(moe)
        prepared = ops.prepare_moe_fp8_weights(moe.w13_weight.data, moe.w2_weight.data, s13, s2,
                                               self.block_size())
        if prepared[0].data_ptr() != moe.w13_weight.data_ptr():
            for p in (moe.w13_weight, moe.w2_weight, *[getattr(moe, f"{n}_{self.scale_name}")
                                                        for n in ("w13", "w2")]):
                p.data = p.data.new_empty(0)
        return prepared

    @staticmethod
    def apply(moe, hidden, topk_weights, topk_ids):
        return ops.fused_moe_fp8_prepared(hidden, moe._prepared, topk_weights, topk_ids,
                                          moe.activation)

    @staticmethod
    def apply_native(moe, hidden, topk_weights, topk_ids):
        w13, w2, s13, s2, block = ops.unpack_moe_fp8_weights(moe._prepared)
        return ops_native.fused_moe_fp8(hidden, w13, w2, s13, s2, topk_weights, topk_ids,
                                        moe.activation, block)


class Fp8OnlineMoEMethod(Fp8MoEMethod):
    """quantization="fp8": float experts loaded as usual, quantized per output channel once."""

    def __init__(self):
        super().__init__("channel")

    def create_weights(self, moe) -> None:
        pass                            # FusedMoE's own float parameters load the checkpoint

    def process_weights_after_loading(self, moe):
        q13, s13 = _quantize_experts(moe.w13_weight.data)
        q2, s2 = _quantize_experts(moe.w2_weight.data)
        moe.w13_weight.data = moe.w13_weight.data.new_empty(0)   # the fp8 copies replace them
        moe.w2_weight.data = moe.w2_weight.data.new_empty(0)
        return ops.prepare_moe_fp8_weights(q13, q2, s13, s2, None)


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [E, N, K] float -> (e4m3 [E, N, K], fp32 [E, N, 1]), per output channel of each expert
    e, n, k = w.shape
    q, s = ops_native.fp8_quantize_weight(w.reshape(e * n, k))
    return q.view(e, n, k), s.view(e, n, 1)


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

    def keeps_plain(self, owner_kind: str, child_name: str, layer_name: str) -> bool:
        # an fp8 checkpoint's kv_b_proj is fp8: MLA dequantizes it once for its absorbed halves
        if owner_kind == "MultiHeadLatentAttention" and not self.online:
            return False
        return super().keeps_plain(owner_kind, child_name, layer_name)

    def get_moe_method(self, layer_name: str, moe):
        if self.skips(layer_name):
            return None
        if self.online:
            return Fp8OnlineMoEMethod()
        if self.block is not None:
            return Fp8MoEMethod("block", "weight_scale_inv", self.block)
        return Fp8MoEMethod("tensor", "weight_scale")

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


def compressed_tensors_fp8_moe_method(scheme: dict) -> Fp8MoEMethod:
    """FusedMoE experts of a compressed-tensors float scheme (strategy tensor, channel or block;
    activations run unquantized, see Fp8MoEMethod)."""
    m = compressed_tensors_fp8_method(scheme)
    return Fp8MoEMethod(m.scale_kind, "weight_scale", m.block)
