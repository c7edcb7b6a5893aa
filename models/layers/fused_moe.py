"""Mixture-of-experts layers: `FusedMoE` (all experts' weights stacked, top-k routing, one fused
expert op, tensor parallel over the intermediate size), `MoEBlock` (router + experts + optional
shared expert) and `MoEWeightRouting`, which routes the checkpoint layouts of the MoE families
(one tensor per expert and projection, or stacked) into the stacked parameters.

Weights: `w13_weight [E, 2I/tp, H]` (gate rows, then up rows, like a dense `gate_up_proj`) and
`w2_weight [E, H, I/tp]`. Each rank holds every expert with a 1/tp slice of I, exactly as a dense
MLP shards, and the partial outputs are all-reduced.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.custom_op import CustomOp
from octavo.models.layers.linear import ReplicatedLinear
from octavo.models.layers.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from octavo.models.loader import _route  # the packed mapping, applied to renamed names

# transformers' hidden_act -> the activation names fused_moe takes
MOE_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# routing_fn(router_logits [T, E], top_k) -> (weights [T, k] fp32, ids [T, k] int32)
RoutingFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def moe_activation(hidden_act: str) -> str:
    if hidden_act not in MOE_ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported for MoE experts; supported: "
                         f"{', '.join(MOE_ACTIVATIONS)}")
    return MOE_ACTIVATIONS[hidden_act]


class FusedMoE(CustomOp):
    """forward(hidden [T, H], router_logits [T, E]) -> [T, H]: route each token to top_k experts
    (ops.topk_routing with the given options, or `routing_fn` where a family routes its own way)
    and sum the chosen experts' gated MLPs weighted by the routing weights.

    `score_bias` adds an fp32 `e_score_correction_bias [E]` parameter that steers the choice of
    experts but not their weights (DeepSeek-V3 noaux_tc, GLM-4.5, ERNIE 4.5)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool = True, scoring: str = "softmax", activation: str = "silu",
                 routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 group_score: str = "max", score_bias: bool = False,
                 routing_fn: RoutingFn | None = None, reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if intermediate_size % self.tp_size:
            raise ValueError(f"moe intermediate size ({intermediate_size}) is not divisible by the "
                             f"tensor parallel size ({self.tp_size})")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts="
                             f"{num_experts}]")
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.intermediate_size = intermediate_size
        self.local_size = intermediate_size // self.tp_size
        self.routing = dict(scoring=scoring, renormalize=renormalize,
                            routed_scaling_factor=routed_scaling_factor, n_group=n_group,
                            topk_group=topk_group, group_score=group_score)
        self.routing_fn = routing_fn
        self.activation, self.reduce_results = activation, reduce_results
        dtype = params_dtype or torch.get_default_dtype()
        i, h = self.local_size, hidden_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * i, h, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, h, i, dtype=dtype),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        if score_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            self.e_score_correction_bias.weight_loader = self._bias_loader
        else:
            self.e_score_correction_bias = None
        self._loaded: set[tuple[int, str]] = set()
        self._prepared = None
        self.quant_method = None   # quantized experts (quantization.apply_quantization)

    def set_quant_method(self, method) -> None:
        """Hand the expert weights to `method` (before loading): it creates its own parameters
        (w13_weight / w2_weight and their scales) and runs the experts."""
        self.quant_method = method
        method.create_weights(self)

    # ---- loading ------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """shard_id (expert, 'w1' | 'w3' | 'w2'): one expert's gate [I, H], up [I, H] or down
        [H, I]. shard_id 'w1' | 'w3' | 'w2' | 'w13': all experts at once, [E, I, H] (also as
        [E * I, H]), [E, H, I], or gate and up stacked as [E, 2I, H]. 'w2_t': all experts' down
        projections stored transposed, [E, I, H] or [E * I, H] (DBRX)."""
        expert, kind = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        if kind == "w13":
            self._check_shape(loaded, (e, 2 * i, h), kind)
            self.weight_loader(param, loaded[:, :i], "w1")
            self.weight_loader(param, loaded[:, i:], "w3")
            return
        if kind == "w2_t":
            loaded, kind = self._experts_view(loaded, i, h, kind).transpose(1, 2), "w2"
        elif expert is None and kind in ("w1", "w3"):
            loaded = self._experts_view(loaded, i, h, kind)
        if kind not in ("w1", "w3", "w2"):
            raise ValueError(f"FusedMoE shard_id must name w1, w3, w2 or w13, got {shard_id!r}")
        full = (i, h) if kind != "w2" else (h, i)
        dst = param.data
        if expert is not None:
            if not 0 <= expert < e:
                raise ValueError(f"expert {expert} is out of range for {e} experts")
            dst = dst[expert]
        self._check_shape(loaded, full if expert is not None else (e, *full), kind)
        # the I dim: rows of gate/up, columns of down; this rank's slice of it
        src = loaded.narrow(-1 if kind == "w2" else -2, self.tp_rank * self.local_size,
                            self.local_size)
        if kind != "w2":
            dst = dst.narrow(-2, 0 if kind == "w1" else self.local_size, self.local_size)
        dst.copy_(src)
        self._loaded.update((x, kind) for x in (range(e) if expert is None else [expert]))

    def _experts_view(self, loaded: torch.Tensor, i: int, h: int, kind: str) -> torch.Tensor:
        if loaded.dim() == 2 and tuple(loaded.shape) == (self.num_experts * i, h):
            return loaded.view(self.num_experts, i, h)
        self._check_shape(loaded, (self.num_experts, i, h), kind)
        return loaded

    @staticmethod
    def _check_shape(loaded: torch.Tensor, shape: tuple, kind: str) -> None:
        if tuple(loaded.shape) != tuple(shape):
            raise ValueError(f"expert weight {kind} of shape {tuple(loaded.shape)} should be "
                             f"{tuple(shape)}")

    @staticmethod
    def _bias_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.numel() != param.numel():  # ERNIE stores it as [1, E]
            raise ValueError(f"score correction bias of shape {tuple(loaded.shape)} should have "
                             f"{param.numel()} values")
        param.data.copy_(loaded.reshape(param.shape))

    def process_weights_after_loading(self) -> None:
        """Checks every expert was loaded and prepares the weights for the kernel once. Where
        the kernel repacks them (CPU), the packed copy replaces the plain one, as for linears."""
        if self._prepared is not None:
            return
        if self._loaded:
            missing = {(x, k) for x in range(self.num_experts) for k in ("w1", "w3", "w2")}
            missing -= self._loaded
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} expert weights, e.g. "
                                 f"(expert, projection) {sorted(missing)[:4]}")
        if self.quant_method is not None:
            self._prepared = self.quant_method.process_weights_after_loading(self)
            return
        self._prepared = ops.prepare_moe_weights(self.w13_weight.data, self.w2_weight.data)
        if self._prepared[0].data_ptr() != self.w13_weight.data_ptr():
            self.w13_weight.data = self.w13_weight.data.new_empty(0)
            self.w2_weight.data = self.w2_weight.data.new_empty(0)

    # ---- forward ------------------------------------------------------------------------------
    def _route(self, impl, router_logits: torch.Tensor):
        if self.routing_fn is not None:
            return self.routing_fn(router_logits, self.top_k)
        return impl.topk_routing(router_logits, self.top_k, bias=self.e_score_correction_bias,
                                 **self.routing)

    def forward_ops(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self._route(ops, router_logits)
        if self._prepared is None:  # a model used without the runner's after-loading step
            self.process_weights_after_loading()
        if self.quant_method is not None:
            return self._reduce(self.quant_method.apply(self, hidden, weights, ids))
        out = ops.fused_moe_prepared(hidden, self._prepared, weights, ids, self.activation)
        return self._reduce(out)

    def forward_native(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self._route(ops_native, router_logits)
        if self.quant_method is not None:
            if self._prepared is None:
                self.process_weights_after_loading()
            return self._reduce(self.quant_method.apply_native(self, hidden, weights, ids))
        w13, w2 = self.w13_weight, self.w2_weight
        if w13.numel() == 0:  # released for a packed copy: the reference reads it unpacked
            p = self._prepared
            w13, w2 = ops_native.unpack_moe_weights(p.w13, p.w2, p.hidden_size, p.inter_size)
        out = ops_native.fused_moe(hidden, w13, w2, weights, ids, self.activation)
        return self._reduce(out)

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(out) if self.reduce_results and self.tp_size > 1 else out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.local_size}, tp={self.tp_rank}/{self.tp_size}")


class MoEBlock(nn.Module):
    """A sparse MoE MLP: `gate` (the router, [E, H]) -> `experts`, plus an optional
    `shared_expert` module every token goes through, scaled by sigmoid(`shared_expert_gate`)
    where the family has that gate (Qwen2-MoE). `router_fp32`: the router weight is kept and
    applied in fp32 whatever the model's dtype (GLM-4.5, ERNIE 4.5 keep it so)."""

    def __init__(self, hidden_size: int, experts: FusedMoE, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, router_fp32: bool = False):
        super().__init__()
        self.router_fp32 = router_fp32
        self.gate = ReplicatedLinear(hidden_size, experts.num_experts,
                                     params_dtype=torch.float32 if router_fp32 else None)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x.float() if self.router_fp32 else x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class MoEWeightRouting:
    """Mixin for a model class: `route_weight(name)` (called by the loader) sends checkpoint
    expert tensors to the stacked FusedMoE parameters.

    `checkpoint_renames`: (regex, replacement) pairs applied to each name first, so that the
    family's names become octavo's (`.block_sparse_moe.` -> `.mlp.`); `expert_projections`: the
    checkpoint's per-expert projection names -> w1 (gate) / w3 (up) / w2 (down);
    `stacked_projections`: the names of all-expert tensors -> their FusedMoE shard kind. Recognised
    after renaming: `<...>.experts.<e>.<proj>.weight` (one expert) and `<...>.experts.<stacked>`
    (by default transformers 5's `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`). A renamed
    name that is neither goes through the model's packed_modules_mapping as any other name."""

    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    expert_projections = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    # names after `<...>.experts.` of tensors that hold all experts -> FusedMoE shard kind
    stacked_projections = {"gate_up_proj": "w13", "down_proj": "w2"}

    def route_weight(self, name: str):
        renamed = name
        for pattern, replacement in self.checkpoint_renames:
            renamed = re.sub(pattern, replacement, renamed)
        # (offsets: GGUF 4-bit experts' W = codes * scales + offsets)
        one = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\."
                           r"(weight\w*|input_scale|qweight|qzeros|scales|offsets|g_idx)", renamed)
        if one and one.group(3) in self.expert_projections:
            kind = self.expert_projections[one.group(3)]
            return (_stacked_param(one.group(1), kind, one.group(4)),
                    (int(one.group(2)), kind))
        stacked = re.fullmatch(r"(.*\.experts)\.(.+)", renamed)
        if stacked and stacked.group(2) in self.stacked_projections:
            kind = self.stacked_projections[stacked.group(2)]
            return _stacked_param(stacked.group(1), kind), kind
        if renamed == name:
            return None
        return _route(renamed, getattr(self, "packed_modules_mapping", {}))


def _stacked_param(experts: str, kind: str, suffix: str = "weight") -> str:
    # suffix: weight, or a quantized checkpoint's weight_scale(_inv) / input_scale / GPTQ's qweight...
    return f"{experts}.{'w2' if kind.startswith('w2') else 'w13'}_{suffix}"
