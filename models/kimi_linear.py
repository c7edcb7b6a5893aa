"""Kimi-Linear (Moonshot): the Llama decoder with Kimi Delta Attention (KDA: a gated delta rule
with a per-channel decay, over a per-request state) on most layers, multi-head latent attention
without rotary (NoPE MLA, paged latent cache) on the `full_attention` layers, and DeepSeek-V3
MoE MLPs (sigmoid scores, bias-steered group-limited top-k, shared expert) after the dense ones.

KDA per layer (transformers' KimiLinearDeltaAttention): q/k/v projections -> one causal conv +
silu over [q | k | v] -> gated delta rule with g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)
per key channel and beta = sigmoid(b_proj(x)), q/k l2-normalised -> RMSNorm per head gated by
sigmoid(g_b(g_a(x))) -> o_proj. Checkpoints keep q/k/v projections and convs apart
(`q_conv1d`, ...); they load into one fused projection and one conv.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.cache_spec import StateSpec
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.linear import ReplicatedLinear, _copy_checked
from octavo.models.layers.mamba import _Conv1dParams, _StateMixer
from octavo.models.layers.mla import MultiHeadLatentAttention
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, LlamaMLP

FULL, LINEAR = "full_attention", "linear_attention"


# transformers' KimiLinearConfig field <- the released checkpoint's own config class's field
_RELEASED_NAMES = (("num_local_experts", "num_experts"),
                   ("num_experts_per_tok", "num_experts_per_token"),
                   ("n_group", "num_expert_group"), ("norm_topk_prob", "moe_renormalize"),
                   ("n_shared_experts", "num_shared_experts"),
                   ("max_position_embeddings", "model_max_length"))
_KDA_SIZES = (("linear_num_heads", "num_heads"), ("linear_head_dim", "head_dim"),
              ("linear_conv_kernel_dim", "short_conv_kernel_size"))


def normalize_config(config) -> None:
    """Give a config built by the released checkpoint's own class (trust_remote_code) the fields
    transformers' KimiLinearConfig derives from it: layer kinds and KDA sizes from the
    `linear_attn_config` sub-dict (1-based `kda_layers`; other layers are MLA), MLP kinds from
    first_k_dense_replace / moe_layer_freq (DeepSeek's rule), and the renamed MoE fields. A config
    transformers built already has them and is left as it is."""
    for ours, theirs in _RELEASED_NAMES:
        if getattr(config, ours, None) is None and getattr(config, theirs, None) is not None:
            setattr(config, ours, getattr(config, theirs))
    linear = getattr(config, "linear_attn_config", None) or {}
    for ours, theirs in _KDA_SIZES:
        if getattr(config, ours, None) is None:
            if theirs not in linear:
                raise ValueError(f"Kimi-Linear config has neither {ours!r} nor "
                                 f"linear_attn_config[{theirs!r}]")
            setattr(config, ours, linear[theirs])
    n = config.num_hidden_layers
    if getattr(config, "layer_types", None) is None:
        kda = set(linear.get("kda_layers") or ())
        config.layer_types = [LINEAR if i + 1 in kda else FULL for i in range(n)]
    if getattr(config, "mlp_layer_types", None) is None:
        first_dense = getattr(config, "first_k_dense_replace", 1)
        freq = getattr(config, "moe_layer_freq", 1) or 1
        moe = bool(getattr(config, "num_local_experts", None))
        config.mlp_layer_types = ["sparse" if moe and i >= first_dense and i % freq == 0
                                  else "dense" for i in range(n)]


def _layer_types(config) -> list[str]:
    kinds = list(config.layer_types)
    if len(kinds) != config.num_hidden_layers or not set(kinds) <= {FULL, LINEAR}:
        raise ValueError(f"Kimi-Linear layer_types must give {config.num_hidden_layers} entries "
                         f"of {FULL!r} / {LINEAR!r}, got {kinds}")
    return kinds


class _SigmoidGatedRMSNorm(nn.Module):
    """Per-head RMSNorm (weight applied in fp32) times sigmoid(gate), as FLA's o_norm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf * torch.sigmoid(gate.float())).to(x.dtype)


class _WholeQKV(ReplicatedLinear):
    """KDA's q/k/v projections fused on the output dim and whole on every rank (the layer runs
    unsplit under tensor parallelism); checkpoint q_proj/k_proj/v_proj load with shard_id
    'q'/'k'/'v'."""

    def __init__(self, hidden: int, dim: int):
        super().__init__(hidden, 3 * dim)
        self.dim = dim

    def output_slices(self) -> list[tuple[object, int]]:
        return [(s, self.dim) for s in "qkv"]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        if shard_id is None or dim is None:
            return _copy_checked(param.data, loaded_weight)
        size = param.data.shape[dim] // 3
        _copy_checked(param.data.narrow(dim, "qkv".index(shard_id) * size, size), loaded_weight)
        return None


class KimiDeltaAttention(_StateMixer):
    """KDA over the per-request state: conv state [3 * H * K, W - 1] (model dtype) and the delta
    rule's state [H, K, K] (fp32). Under tensor parallelism every rank runs the whole layer
    (replicated weights, the whole state), as the Mamba mixers do."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.linear_num_heads, config.linear_head_dim
        self.qkv_dim = dim = self.num_heads * self.head_dim
        self.conv_width = config.linear_conv_kernel_dim
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"Kimi-Linear KDA activation {config.hidden_act!r} is not supported: "
                             "the causal conv ops apply silu")
        self.activation = "silu"
        self.qkv_proj = _WholeQKV(hidden, dim)
        self.conv1d = _Conv1dParams(3 * dim, self.conv_width, bias=False)
        self.conv1d.weight.weight_loader = self._load_conv
        self.f_a_proj = ReplicatedLinear(hidden, self.head_dim)
        self.f_b_proj = ReplicatedLinear(self.head_dim, dim)
        # fp32 in the checkpoint and in transformers whatever the model dtype
        self.dt_bias = nn.Parameter(torch.empty(dim, dtype=torch.float32), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, self.num_heads, 1), requires_grad=False)
        self.b_proj = ReplicatedLinear(hidden, self.num_heads)
        self.g_a_proj = ReplicatedLinear(hidden, self.head_dim)
        self.g_b_proj = ReplicatedLinear(self.head_dim, dim)
        self.o_norm = _SigmoidGatedRMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = ReplicatedLinear(dim, hidden)

    def _load_conv(self, param, loaded: torch.Tensor, shard_id=None) -> None:
        # q_conv1d / k_conv1d / v_conv1d [D, 1, W] -> rows of the fused [3D, 1, W]
        if shard_id is None:
            rows = param.data
        else:
            rows = param.data.narrow(0, "qkv".index(shard_id) * self.qkv_dim, self.qkv_dim)
        if tuple(loaded.shape) != tuple(rows.shape):
            raise ValueError(f"conv weight of shape {tuple(loaded.shape)} does not fit "
                             f"{tuple(rows.shape)}")
        rows.copy_(loaded)

    def cache_spec(self) -> StateSpec:
        return StateSpec(((3 * self.qkv_dim, self.conv_width - 1),
                          (self.num_heads, self.head_dim, self.head_dim)),
                         (None, torch.float32))

    def forward_ops(self, positions, hidden, attn_metadata):
        return super().forward_ops(hidden, attn_metadata)

    def forward_native(self, positions, hidden, attn_metadata):
        return super().forward_native(hidden, attn_metadata)

    def _forget_gate(self, hidden: torch.Tensor) -> torch.Tensor:
        # [T, hidden] -> log-decay g [T, H, K] fp32 (<= 0)
        g = self.f_b_proj(self.f_a_proj(hidden)).float() + self.dt_bias.float()
        g = F.softplus(g.view(-1, self.num_heads, self.head_dim))
        return -torch.exp(self.A_log.float().view(1, -1, 1)) * g

    def _forward(self, impl, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        # hidden: [T, hidden_size] -> [T, hidden_size]
        self._check_cache(md)
        decode = md.max_query_len == 1
        T, H, K = hidden.shape[0], self.num_heads, self.head_dim
        qkv = self._conv(impl, self.qkv_proj(hidden), md, decode)           # [T, 3 * H * K]
        q, k, v = (t.view(T, H, K) for t in qkv.split(self.qkv_dim, dim=-1))
        g = self._forget_gate(hidden)
        beta = torch.sigmoid(self.b_proj(hidden)).float()                   # [T, H]
        if decode:
            out = impl.gated_delta_rule_update(self.ssm_states, q, k, v, g, beta,
                                               md.state_indices)
        else:
            out = impl.gated_delta_rule(q, k, v, g, beta, self.ssm_states, md.query_start_loc,
                                        md.state_indices, md.has_initial_state)
        gate = self.g_b_proj(self.g_a_proj(hidden)).view(T, H, K)
        return self.o_proj(self.o_norm(out, gate).reshape(T, self.qkv_dim))


class _NoRope(nn.Module):
    """Kimi's MLA keeps the rope slice of q and the shared key but never rotates them."""

    def forward(self, positions, q, k):
        return q, k


class _ShortPositions:
    """The config as MultiHeadLatentAttention reads it, with a one-position rotary table
    (replaced by _NoRope; the real one would hold max_position_embeddings = 1M rows)."""
    max_position_embeddings = 1

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        return getattr(self._config, name)


class KimiMLA(MultiHeadLatentAttention):
    def __init__(self, config):
        scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
        super().__init__(_ShortPositions(config), rope_neox=True, scale=scale)
        self.rotary_emb = _NoRope()


class KimiLinearForCausalLM(MoEWeightRouting, LlamaForCausalLM):
    # q/k/v_proj are MLA's own projections on attention layers; KDA's are fused by route_weight
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    checkpoint_renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.experts.e_score_correction_bias"),
        (r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
    )
    expert_projections = {"w1": "w1", "w3": "w3", "w2": "w2",
                          "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    # tensor parallel: the KDA layers run whole on every rank (each rank keeps the whole
    # state), MLA heads, MLPs, experts and the vocabulary are split; pipeline stages would
    # each need the request's state slots
    supports_tensor_parallel = True
    pipeline_parallel_limit = "its KDA layers keep a per-request state"
    supports_pipeline_parallel = False
    # decode runs in CUDA graphs: every op of the step has a CUDA kernel (gated_delta_rule's
    # decode form included) and no host sync or value-dependent shape; checked on the meta
    # device (tests/models/test_kimi_linear_decode_graph.py), never captured on a real GPU here.
    # Still eager-only on CUDA (capture fails, enforce_eager=True): fp32 models (fused_moe's
    # reference) and key dims over 256 (gated_delta_rule's reference)
    cuda_graphs = True

    def __init__(self, config):
        normalize_config(config)
        super().__init__(config)
        self._kda_layers = {i for i, kind in enumerate(_layer_types(config)) if kind == LINEAR}

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        if _layer_types(config)[opts.layer_idx] == FULL:
            return KimiMLA(config)
        return KimiDeltaAttention(config)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        kind = config.mlp_layer_types[layer_idx]
        if kind == "dense":
            return LlamaMLP(config)
        if kind != "sparse":
            raise ValueError(f"Kimi-Linear mlp_layer_types[{layer_idx}] is {kind!r}: expected "
                             "'dense' or 'sparse'")
        experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok,
                           config.hidden_size, config.moe_intermediate_size,
                           routed_scaling_factor=config.routed_scaling_factor,
                           activation=moe_activation(config.hidden_act), scoring="sigmoid",
                           renormalize=bool(config.norm_topk_prob), score_bias=True,
                           n_group=config.n_group or 1, topk_group=config.topk_group or 1,
                           group_score="top2_sum")
        shared = None
        if config.n_shared_experts:
            shared = LlamaMLP(config, intermediate_size=config.moe_intermediate_size
                              * config.n_shared_experts)
        return MoEBlock(config.hidden_size, experts, shared_expert=shared, router_fp32=True)

    def route_weight(self, name: str):
        m = re.fullmatch(r"(model\.layers\.(\d+)\.self_attn)\.([qkv])_(proj|conv1d)\.weight", name)
        if m and int(m.group(2)) in self._kda_layers:
            target = "qkv_proj" if m.group(4) == "proj" else "conv1d"
            return f"{m.group(1)}.{target}.weight", m.group(3)
        return super().route_weight(name)
