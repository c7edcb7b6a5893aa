"""The Llama-family decoder stack run from C++ on CPU (`octavo.DecoderPlan`, csrc/cpu/decoder_plan.cpp).

A decode step of a small model is hundreds of short kernels; called from Python each pays a
module call, argument checks and a dispatcher trip (about 110 us a layer on the 2-core machines,
a quarter of a 1B MoE's step: bench/README.md). The plan holds each layer's packed weights, norms,
KV cache and routing options and runs the layers' kernels from C++, in the order and on the
inputs the Python layers use, so its output is bit-identical to theirs (tests/models/
test_decoder_plan.py checks that on every family it takes).

`plan_for(model, positions)` returns the plan for a LlamaModel's held layers, or None, and then
the Python layers run as before. A model qualifies when, on the CPU and one rank, every held layer
is a LlamaDecoderLayer (RMSNorms, Gemma's included, in any of its four norm slots; a residual
multiplier) whose attention is LlamaAttention on the paged cache (no ALiBi; a q/k RMSNorm per head
or over all heads, clip_qkv, rotary with a fixed cos/sin table or none) and whose MLP is a gated LlamaMLP or a MoEBlock on the bf16
FusedMoE kernel (top-k routing, optional shared expert and its sigmoid gate), with every linear a
bf16 weight packed for ops.linear_packed, or a 4-bit (INT4 kernel) or weight-only 8-bit weight
(GPTQ, AWQ, GGUF, quantization="int4"), and no LoRA. `plan_status(model)` says why
not. The plan is rebuilt whenever the runner binds new KV caches. OCTAVO_CPU_DECODER_PLAN=0 turns
it off.
"""
from __future__ import annotations

import logging
import os

import torch

from octavo import ops
from octavo.models.layers import cpu_gemm
from octavo.models.layers.activation import GeluAndMul, SiluAndMul
from octavo.models.layers.attention import Attention
from octavo.models.layers.custom_op import CustomOp
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                         ReplicatedLinear, RowParallelLinear,
                                         UnquantizedLinearMethod)
from octavo.models.layers.quantization.int4 import Int4LinearMethod
from octavo.models.layers.quantization.int8 import Int8WoqLinearMethod
from octavo.models.layers.rotary import (DynamicNTKScalingRotaryEmbedding, Llama3RotaryEmbedding,
                                         LinearScalingRotaryEmbedding, RotaryEmbedding,
                                         YaRNScalingRotaryEmbedding)

logger = logging.getLogger(__name__)

# rotary classes whose forward is the base one over a cos/sin table fixed at construction
_FIXED_TABLE_ROPES = (RotaryEmbedding, LinearScalingRotaryEmbedding,
                      DynamicNTKScalingRotaryEmbedding, Llama3RotaryEmbedding,
                      YaRNScalingRotaryEmbedding)
_LINEARS = (QKVParallelLinear, RowParallelLinear, MergedColumnParallelLinear, ReplicatedLinear)


def enabled() -> bool:
    return os.environ.get("OCTAVO_CPU_DECODER_PLAN", "1") != "0" and not ops.USING_NATIVE


class _NotEligible(Exception):
    pass


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise _NotEligible(why)


def _plain(module, what: str) -> None:
    # no per-instance forward (a profiler or adapter patched in) and no per-instance native switch
    _require("forward" not in vars(module), f"{what} has a patched forward")
    _require(not getattr(module, "use_native", False), f"{what} runs its native reference")


class _LayerArgs:
    """The four dicts DecoderPlan.add_layer takes: tensors, ints, floats, strings."""

    def __init__(self):
        self.t: dict[str, torch.Tensor] = {}
        self.i: dict[str, int] = {}
        self.f: dict[str, float] = {}
        self.s: dict[str, str] = {}

    def linear(self, name: str, layer) -> None:
        _require(type(layer) in _LINEARS, f"{name} is a {type(layer).__name__} (LoRA or custom)")
        _plain(layer, name)
        _require(layer.tp_size == 1, f"{name} is tensor parallel")
        method, bias = layer.quant_method, layer.bias
        if type(method) is UnquantizedLinearMethod:
            packed = getattr(layer, "packed_weight", None)
            if packed is None:                       # F.linear on the plain weight
                self._dense(name, layer.weight.data)
            elif isinstance(packed, cpu_gemm.PanelWeight):
                self.t[f"{name}.packed"], self.i[f"{name}.n"], self.i[f"{name}.kind"] = \
                    packed.data, packed.n, 0
            else:                                    # oneDNN's prepacked weight
                self.t[f"{name}.packed"], self.i[f"{name}.n"], self.i[f"{name}.kind"] = \
                    packed, packed.size(0), 4
        elif isinstance(method, Int4LinearMethod) and type(method).apply is Int4LinearMethod.apply:
            if getattr(layer, "int4_weight", None) is None and getattr(layer, "dequantized", None) is None:
                method.process_weights_after_loading(layer)   # as apply() would on its first call
            w = layer.int4_weight
            if w is None:                            # dequantized at load: F.linear
                self._dense(name, layer.dequantized)
            else:
                self._quantized(name, 1, w.packed, w.scales_offsets, w.n, w.group_size)
                if w.perm is not None:
                    self.t[f"{name}.perm"] = w.perm
        elif (isinstance(method, Int8WoqLinearMethod)
              and type(method).apply is Int8WoqLinearMethod.apply):
            if getattr(layer, "int8_woq", None) is None and getattr(layer, "dequantized", None) is None:
                method.process_weights_after_loading(layer)
            w = layer.int8_woq
            if w is None:
                self._dense(name, layer.dequantized)
            else:
                self._quantized(name, 2, w.packed, w.scales_offsets, w.n, w.group_size)
        else:
            raise _NotEligible(f"{name} is quantized with {type(method).__name__}")
        if bias is not None:
            self.t[f"{name}.bias"] = bias.data

    def _dense(self, name: str, weight) -> None:
        _require(weight is not None and weight.dim() == 2, f"{name} has no weight to apply")
        self.t[f"{name}.packed"] = weight
        self.i.update({f"{name}.n": weight.shape[0], f"{name}.kind": 3})

    def _quantized(self, name: str, kind: int, packed, scales_offsets, n: int,
                   group_size: int) -> None:
        self.t[f"{name}.packed"], self.t[f"{name}.scales_offsets"] = packed, scales_offsets
        self.i.update({f"{name}.n": n, f"{name}.kind": kind, f"{name}.group_size": group_size})

    def norm(self, name: str, norm) -> None:
        _require(_is_rms_norm(norm), f"{name} is a {type(norm).__name__}, not RMSNorm")
        _plain(norm, name)
        self.t[name], self.f[name.replace("norm", "eps")] = norm.weight.data, float(norm.eps)

    def mlp(self, prefix: str, mlp) -> None:
        from octavo.models.llama import LlamaMLP
        _require(type(mlp) is LlamaMLP, f"the MLP is a {type(mlp).__name__}")
        self.linear(f"{prefix}gate_up", mlp.gate_up_proj)
        self.linear(f"{prefix}down", mlp.down_proj)
        act = mlp.act_fn
        _plain(act, "the activation")
        if type(act) is SiluAndMul:
            self.s[f"{prefix}act"] = "silu"
        else:
            _require(type(act) is GeluAndMul, f"the activation is a {type(act).__name__}")
            self.s[f"{prefix}act"] = "gelu_tanh" if act.approximate == "tanh" else "gelu"

    def attention(self, attn) -> None:
        from octavo.models.llama import LlamaAttention
        _require(type(attn) is LlamaAttention, f"the attention is a {type(attn).__name__}")
        self.f["clip"] = float(attn.clip_qkv or 0.0)
        hd = attn.head_dim
        self.linear("qkv", attn.qkv_proj)
        self.linear("o", attn.o_proj)
        self.i.update(q_size=attn.q_size, kv_size=attn.kv_size, num_heads=attn.num_heads,
                      num_kv_heads=attn.num_kv_heads, head_dim=hd)
        if attn.qk_norm:
            for name, width in (("q_norm", attn.q_size), ("k_norm", attn.kv_size)):
                norm = getattr(attn, name)
                _require(_is_rms_norm(norm) and width % norm.hidden_size == 0,
                         "the q/k norm is not an RMSNorm over heads")
                _plain(norm, name)
                self.t[name], self.i[f"{name}_size"] = norm.weight.data, norm.hidden_size
            _require(attn.q_norm.eps == attn.k_norm.eps, "q and k norms differ in eps")
            self.f["qk_eps"] = float(attn.q_norm.eps)
        rope = attn.rotary_emb
        self.i["neox"] = 1
        if rope is not None:
            _require(type(rope) in _FIXED_TABLE_ROPES, f"rotary is a {type(rope).__name__}")
            _require(rope.head_size == hd, "rotary head size differs from the attention's")
            _plain(rope, "rotary")
            self.t["cos_sin"] = rope._cache_on(torch.device("cpu"))
            self.i["neox"] = int(rope.is_neox_style)
        core = attn.attn
        _require(type(core) is Attention, f"the attention core is a {type(core).__name__}")
        _plain(core, "attention")
        _require(core.alibi_slopes is None, "the attention uses ALiBi")
        _require(core.has_cache, "no KV cache is bound")
        _require(not core.calculate_kv_scales, "the K/V scales are calculated on the first batch")
        self.t["k_cache"], self.t["v_cache"] = core.k_cache, core.v_cache
        self.f.update(scale=core.scale, soft_cap=float(core.logit_soft_cap),
                      k_scale=float(core.k_scale), v_scale=float(core.v_scale))
        self.i["window"] = int(core.sliding_window)

    def moe(self, block) -> None:
        self.linear("router", block.gate)
        self.i["router_fp32"] = int(block.router_fp32)
        experts = block.experts
        _require(type(experts) is FusedMoE, f"the experts are a {type(experts).__name__}")
        _plain(experts, "experts")
        _require(experts.quant_method is None, "the experts are quantized")
        _require(experts.routing_fn is None, "the family routes with its own function")
        _require(experts.tp_size == 1, "the experts are tensor parallel")
        if experts._prepared is None:   # as its forward would on the first call
            experts.process_weights_after_loading()
        prepared = experts._prepared
        _require(isinstance(prepared, ops.PackedMoEWeights), "the experts are not packed for the CPU")
        r = experts.routing
        self.i.update(moe=1, top_k=experts.top_k, n_group=r["n_group"],
                      topk_group=r["topk_group"], inter=prepared.inter_size,
                      renormalize=int(r["renormalize"]))
        self.s.update(scoring=r["scoring"], group_score=r["group_score"],
                      moe_act=experts.activation)
        self.f["routed_scaling"] = float(r["routed_scaling_factor"])
        if experts.e_score_correction_bias is not None:
            self.t["score_bias"] = experts.e_score_correction_bias.data.to(torch.float32).contiguous()
        self.t["w13"], self.t["w2"] = prepared.w13, prepared.w2
        if block.shared_expert is not None:
            self.mlp("shared.", block.shared_expert)
            if block.shared_expert_gate is not None:
                self.linear("shared_gate", block.shared_expert_gate)


def _is_rms_norm(norm) -> bool:
    # RMSNorm, or a subclass that only changes how its weight loads (Gemma's 1 + w)
    cls = type(norm)
    return isinstance(norm, RMSNorm) and all(
        getattr(cls, name) is getattr(RMSNorm, name)
        for name in ("forward", "forward_ops", "forward_native", "_forward"))


def _layer_args(layer) -> _LayerArgs:
    from octavo.models.llama import LlamaDecoderLayer
    _require(type(layer) is LlamaDecoderLayer, f"the layer is a {type(layer).__name__}")
    _plain(layer, "the layer")
    a = _LayerArgs()
    for slot in ("pre_attn", "post_attn", "pre_mlp", "post_mlp"):
        norm = layer._norm(slot)
        if norm is not None:
            a.norm(f"{slot}_norm", norm)
    a.f["residual_scale"] = float(layer.residual_scale)
    a.attention(layer.self_attn)
    if type(layer.mlp) is MoEBlock:
        a.moe(layer.mlp)
    else:
        a.i["moe"] = 0
        a.mlp("mlp.", layer.mlp)
    return a


def _build(model) -> tuple[object | None, str]:
    layers = model.stage_layers
    try:
        _require(len(layers) > 0, "the stage holds no layers")
        _require(all(p.device.type == "cpu" for p in model.parameters()), "the model is not on CPU")
        plan = torch.classes.octavo.DecoderPlan()
        for idx, layer in enumerate(layers):
            try:
                a = _layer_args(layer)
            except _NotEligible as e:
                raise _NotEligible(f"layer {idx}: {e}") from None
            plan.add_layer(a.t, a.i, a.f, a.s)
    except _NotEligible as e:
        return None, str(e)
    return plan, "ok"


def plan_status(model) -> tuple[object | None, str]:
    """(plan, "ok") or (None, why) for a LlamaModel as its KV caches are bound now."""
    if not enabled():
        return None, "OCTAVO_CPU_DECODER_PLAN=0 or the compiled kernels are not in use"
    cached = vars(model).get("_decoder_plan")
    if cached is None or cached[0] != Attention.cache_bindings:
        plan, why = _build(model)
        if plan is None:
            logger.debug("%s runs its layers from Python: %s", type(model).__name__, why)
        cached = (Attention.cache_bindings, plan, why)
        model.__dict__["_decoder_plan"] = cached
    return cached[1], cached[2]


def plan_for(model, positions: torch.Tensor):
    """The plan to run this step's layers with, or None (run them from Python)."""
    if CustomOp.use_native or positions.shape[0] == 0 or positions.device.type != "cpu":
        return None
    return plan_status(model)[0]
