"""Linear layers with tensor-parallel sharding and a `weight_loader` on every parameter.

Sharding follows Megatron/vLLM: column-parallel layers split the output dim across ranks,
row-parallel layers split the input dim and all-reduce. Fused layers (gate_up, qkv) load each
checkpoint projection into its slice via `shard_id`. The math lives in a `quant_method`
(`UnquantizedLinearMethod` by default), the seam where quantized methods plug in
(models/layers/quantization: GPTQ, AWQ, INT4 at load). Parameters are [out, in]-shaped (group
scales [out, groups]), so one weight_loader shards and fuses every kind.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo.models.layers import cpu_gemm
from octavo.models.layers.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor parallel size "
                         f"({denominator})")
    return numerator // denominator


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit the "
                         f"parameter slice of shape {tuple(dst.shape)}")
    dst.copy_(src)


def _take_shard(loaded: torch.Tensor, dim: int, index: int, size: int, full: int) -> torch.Tensor:
    # Slice `index` (of width `size`) of a checkpoint tensor whose dim must be `full` wide.
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} should have size "
                         f"{full} in dim {dim}")
    return loaded.narrow(dim, index * size, size)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id=None) -> None:
    """Copy a whole, unsharded tensor (casting to the parameter's dtype)."""
    _copy_checked(param.data, loaded_weight)


class LinearMethodBase:
    """Creates a layer's parameters and applies it; quantized methods subclass this."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_size_per_partition: int, params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn loaded checkpoint weights into the layout `apply` runs fastest on."""


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer, input_size_per_partition, output_size_per_partition,
                       params_dtype):
        weight = nn.Parameter(torch.empty(output_size_per_partition, input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        weight.input_dim, weight.output_dim = 1, 0
        weight.weight_loader = layer.weight_loader
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer):
        if getattr(layer, "packed_weight", None) is not None:
            return
        layer.packed_weight = cpu_gemm.pack(layer.weight, in_place=True)
        if layer.packed_weight is not None:          # the packed copy replaces the plain one
            layer.weight.data = layer.weight.data.new_empty(0)

    def apply(self, layer, x, bias=None):
        return cpu_gemm.linear_or_packed(x, layer.weight, getattr(layer, "packed_weight", None), bias)


class LinearBase(nn.Module):
    """Common constructor: per-partition sizes, weight via quant_method, optional bias."""

    def __init__(self, input_size: int, output_size: int, input_size_per_partition: int,
                 output_size_per_partition: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None,
                 quant_method: LinearMethodBase | None = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method: LinearMethodBase = UnquantizedLinearMethod()
        self.set_quant_method(quant_method or self.quant_method)
        if bias:
            self.bias = nn.Parameter(torch.empty(self._bias_size(), dtype=self.params_dtype),
                                     requires_grad=False)
            self.bias.output_dim = 0
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _bias_size(self) -> int:
        return self.output_size_per_partition

    def output_slices(self) -> list[tuple[object, int]]:
        """(checkpoint shard id, width) of each projection fused on this rank's output dim,
        in order; LoRA adapters (octavo.lora) attach per projection through it."""
        return [(None, self.output_size_per_partition)]

    def set_quant_method(self, method: LinearMethodBase) -> None:
        """Hand the layer's weights to `method` (quantization.apply_quantization calls this
        before loading): the previous method's parameters go, the new method creates its own."""
        old = getattr(self, "weight", None)
        device = old.device if isinstance(old, torch.Tensor) else torch.get_default_device()
        for name in getattr(self, "_method_params", ()):
            delattr(self, name)
        before = set(self._parameters)
        self.quant_method = method
        with torch.device(device):
            method.create_weights(self, self.input_size_per_partition,
                                  self.output_size_per_partition, self.params_dtype)
        self._method_params = [n for n in self._parameters if n not in before]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kwargs):
        super().__init__(input_size, output_size, input_size, output_size, bias, **kwargs)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        _copy_checked(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by output rows across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kwargs):
        tp_size = get_tp_size()
        out_per = _divide(output_size, tp_size, "output size")
        super().__init__(input_size, output_size, input_size, out_per, bias, **kwargs)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        if dim is not None:
            size = param.data.shape[dim]
            loaded_weight = _take_shard(loaded_weight, dim, self.tp_rank, size, size * self.tp_size)
        _copy_checked(param.data, loaded_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused on the output dim (gate_up_proj);
    checkpoint projection i is loaded with shard_id=i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, **kwargs):
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            _divide(size, get_tp_size(), "merged output size")
        super().__init__(input_size, sum(output_sizes), bias, **kwargs)

    def output_slices(self) -> list[tuple[object, int]]:
        return [(i, size // self.tp_size) for i, size in enumerate(self.output_sizes)]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        if shard_id is None:
            if dim is None:
                return _copy_checked(param.data, loaded_weight)
            _take_shard(loaded_weight, dim, 0, 0, sum(self.output_sizes))  # checks the size
            offset = 0  # an already-fused checkpoint tensor: split it into its projections
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(dim, offset, size), i)
                offset += size
            return None
        if dim is None:                 # not split by output (g_idx): the same for every shard
            return _copy_checked(param.data, loaded_weight)
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id {shard_id} out of range for {len(self.output_sizes)} "
                             "merged projections")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        dst = param.data.narrow(dim, offset, size)
        _copy_checked(dst, _take_shard(loaded_weight, dim, self.tp_rank, size,
                                       self.output_sizes[shard_id]))
        return None


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; heads split across ranks (kv heads replicated when there are
    fewer kv heads than ranks). Checkpoint q_proj/k_proj/v_proj load with shard_id 'q'/'k'/'v'."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False, **kwargs):
        tp_size = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads,
                                                "tensor parallel size over kv heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of kv heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, **kwargs)

    def output_slices(self) -> list[tuple[object, int]]:
        return [("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size)]

    def _shard(self, shard_id: str) -> tuple[int, int, int, int]:
        # -> (offset in this rank's parameter, size, index of the checkpoint slice to take,
        #     full checkpoint size of this projection)
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank, self.total_num_heads * self.head_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        if shard_id == "k":
            return self.q_size, self.kv_size, kv_rank, self.total_num_kv_heads * self.head_size
        if shard_id == "v":
            return (self.q_size + self.kv_size, self.kv_size, kv_rank,
                    self.total_num_kv_heads * self.head_size)
        raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        if shard_id is None:
            if dim is None:
                return _copy_checked(param.data, loaded_weight)
            total_q = self.total_num_heads * self.head_size
            total_kv = self.total_num_kv_heads * self.head_size
            _take_shard(loaded_weight, dim, 0, 0, total_q + 2 * total_kv)  # checks the size
            for sid, offset, size in (("q", 0, total_q), ("k", total_q, total_kv),
                                      ("v", total_q + total_kv, total_kv)):
                self.weight_loader(param, loaded_weight.narrow(dim, offset, size), sid)
            return None
        if dim is None:                 # not split by output (g_idx): the same for every shard
            return _copy_checked(param.data, loaded_weight)
        offset, size, index, full = self._shard(shard_id)
        dst = param.data.narrow(dim, offset, size)
        _copy_checked(dst, _take_shard(loaded_weight, dim, index, size, full))
        return None


class RowParallelLinear(LinearBase):
    """Y = X A with A split by input columns across ranks; partial outputs are all-reduced.
    The input is expected already sharded (the output of a column-parallel layer)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 reduce_results: bool = True, **kwargs):
        tp_size = get_tp_size()
        in_per = _divide(input_size, tp_size, "input size")
        self.reduce_results = reduce_results
        super().__init__(input_size, output_size, in_per, output_size, bias, **kwargs)
        if self.bias is not None:
            self.bias.output_dim = None  # the bias is replicated, added once after the reduce

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "input_dim", None)
        if dim is not None:
            size = param.data.shape[dim]
            loaded_weight = _take_shard(loaded_weight, dim, self.tp_rank, size, size * self.tp_size)
        _copy_checked(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        y = self.quant_method.apply(self, x, bias)
        if self.reduce_results and self.tp_size > 1:
            y = tp_all_reduce(y)
        return y
