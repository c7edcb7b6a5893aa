"""Mamba mixers over a per-request state cache: Mamba-1 (selective scan, with the RMS norms on
dt/B/C of Falcon-Mamba (weightless) and Jamba) and Mamba-2 (SSD heads with a gated group RMSNorm).

Each mixer is a CacheLayer whose StateSpec is (conv state [conv_dim, W-1] in the model dtype,
SSM state in fp32); the runner binds slot tensors and the step's AttentionMetadata names each
sequence's slot (`state_indices`) and whether its state carries over (`has_initial_state`).
A step of one token per sequence takes the decode ops (`*_update`, graph-capturable); any other
step the varlen prefill ops, which also take decode rows mixed with prefill chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.cache_spec import CacheLayer, StateSpec
from octavo.models.layers.custom_op import CustomOp
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import ReplicatedLinear


class _Conv1dParams(nn.Module):
    """The checkpoint's depthwise nn.Conv1d parameters: weight [D, 1, W], bias [D]."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(channels), requires_grad=False)
        else:
            self.register_parameter("bias", None)


def _weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Falcon-Mamba's norms on dt, B, C (transformers' FalconMambaWeightlessRMSNorm), in fp32
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _StateMixer(CustomOp, CacheLayer):
    """Holds the bound (conv_states, ssm_states) slot tensors."""
    conv_states: torch.Tensor | None = None
    ssm_states: torch.Tensor | None = None

    def bind_cache(self, caches: tuple[torch.Tensor, ...] | None) -> None:
        self.conv_states, self.ssm_states = caches if caches is not None else (None, None)

    def _check_cache(self, md: AttentionMetadata) -> None:
        if self.conv_states is None or md.state_indices is None:
            raise RuntimeError(f"{type(self).__name__} runs only with state slots bound by the "
                               "model runner and state_indices in the step's metadata")

    def forward_ops(self, hidden, attn_metadata):
        return self._forward(ops, hidden, attn_metadata)

    def forward_native(self, hidden, attn_metadata):
        return self._forward(ops_native, hidden, attn_metadata)

    def _conv(self, impl, x: torch.Tensor, md: AttentionMetadata, decode: bool) -> torch.Tensor:
        # x: [T, conv_dim] -> activated conv output [T, conv_dim]; updates the conv states
        weight = self.conv1d.weight.view(self.conv1d.weight.shape[0], -1)   # [D, W]
        if decode:
            return impl.causal_conv1d_update(x, self.conv_states, weight, self.conv1d.bias,
                                             md.state_indices, self.activation)
        return impl.causal_conv1d(x, weight, self.conv1d.bias, self.conv_states,
                                  md.query_start_loc, md.state_indices, md.has_initial_state,
                                  self.activation)


class MambaMixer(_StateMixer):
    """Mamba-1 mixer (transformers' MambaMixer / FalconMambaMixer): in_proj -> causal conv ->
    x_proj (dt, B, C) -> selective scan gated by silu(z) -> out_proj."""

    def __init__(self, config, rms_norm_eps: float | None = None, norm_weights: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.inter = int(getattr(config, "intermediate_size", None) or config.expand * hidden)
        self.state_size = config.state_size
        self.conv_width = config.conv_kernel
        self.dt_rank = int(config.time_step_rank)
        self.activation = config.hidden_act
        if self.activation not in ("silu", "swish"):
            raise ValueError(f"Mamba mixer activation {self.activation!r} is not supported: the "
                             "causal conv ops apply silu")
        self.activation = "silu"
        # Falcon-Mamba normalizes dt, B and C (weightless RMS norms) before using them; Jamba
        # (norm_weights) with RMSNorms of their own (dt_layernorm, b_layernorm, c_layernorm)
        self.rms_norm_eps = rms_norm_eps
        self.norm_weights = norm_weights
        if norm_weights:
            self.dt_layernorm = RMSNorm(self.dt_rank, eps=rms_norm_eps)
            self.b_layernorm = RMSNorm(self.state_size, eps=rms_norm_eps)
            self.c_layernorm = RMSNorm(self.state_size, eps=rms_norm_eps)
        self.in_proj = ReplicatedLinear(hidden, 2 * self.inter, bias=config.use_bias)
        self.conv1d = _Conv1dParams(self.inter, self.conv_width, config.use_conv_bias)
        self.x_proj = ReplicatedLinear(self.inter, self.dt_rank + 2 * self.state_size, bias=False)
        self.dt_proj = ReplicatedLinear(self.dt_rank, self.inter, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.inter, self.state_size), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.inter), requires_grad=False)
        self.out_proj = ReplicatedLinear(self.inter, hidden, bias=config.use_bias)

    def cache_spec(self) -> StateSpec:
        return StateSpec(((self.inter, self.conv_width - 1), (self.inter, self.state_size)),
                         (None, torch.float32))

    def _forward(self, impl, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        # hidden: [T, hidden_size] -> [T, hidden_size]
        self._check_cache(md)
        decode = md.max_query_len == 1
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = self._conv(impl, x.contiguous(), md, decode)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        if self.norm_weights:
            dt, B, C = (self.dt_layernorm(dt.contiguous()), self.b_layernorm(B.contiguous()),
                        self.c_layernorm(C.contiguous()))
        elif self.rms_norm_eps is not None:
            dt, B, C = (_weightless_rms_norm(v, self.rms_norm_eps) for v in (dt, B, C))
        # dt_proj without its bias, which the scan adds (in fp32) as delta_bias
        dt = self.dt_proj.quant_method.apply(self.dt_proj, dt.contiguous(), None)
        A = -torch.exp(self.A_log.float())
        B, C, z = B.contiguous(), C.contiguous(), z.contiguous()
        dt_bias = self.dt_proj.bias.float()
        if decode:
            y = impl.selective_state_update(self.ssm_states, x, dt, A, B, C, self.D, z, dt_bias,
                                            True, md.state_indices)
        else:
            y = impl.selective_scan(x, dt, A, B, C, self.D, z, dt_bias, True, self.ssm_states,
                                    md.query_start_loc, md.state_indices, md.has_initial_state)
        return self.out_proj(y)


class MambaRMSNormGated(nn.Module):
    """Mamba-2's norm: x * silu(gate), then RMS-normalized in `group_size` groups, in fp32."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() * F.silu(gate.float())
        g = xf.view(*xf.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(xf.shape).to(dtype)


class Mamba2Mixer(_StateMixer):
    """Mamba-2 mixer (transformers' Mamba2Mixer): in_proj -> [gate | x B C | dt], causal conv
    over x B C, SSD scan over heads, gated group RMSNorm, out_proj."""

    def __init__(self, config, num_heads: int | None = None, head_dim: int | None = None,
                 n_groups: int | None = None, state_size: int | None = None,
                 conv_kernel: int | None = None, chunk_size: int | None = None,
                 intermediate_size: int | None = None, use_bias: bool | None = None,
                 use_conv_bias: bool | None = None, norm_eps: float | None = None,
                 time_step_limit=None):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = num_heads or config.num_heads
        self.head_dim = head_dim or config.head_dim
        self.n_groups = n_groups or config.n_groups
        self.state_size = state_size or config.state_size
        self.conv_width = conv_kernel or config.conv_kernel
        self.chunk_size = chunk_size or config.chunk_size
        self.inter = intermediate_size or int(config.expand * hidden)
        if self.inter != self.num_heads * self.head_dim:
            raise ValueError(f"Mamba-2 mixer: intermediate size {self.inter} must equal num_heads "
                             f"* head_dim = {self.num_heads * self.head_dim}")
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba-2 mixer: {self.num_heads} heads do not divide into "
                             f"{self.n_groups} groups")
        use_bias = config.use_bias if use_bias is None else use_bias
        use_conv_bias = config.use_conv_bias if use_conv_bias is None else use_conv_bias
        eps = config.layer_norm_epsilon if norm_eps is None else norm_eps
        limit = time_step_limit if time_step_limit is not None else getattr(
            config, "time_step_limit", None)
        self.dt_limit = tuple(float(v) for v in (limit or (0.0, float("inf"))))
        self.activation = "silu"
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"Mamba-2 mixer activation {config.hidden_act!r} is not supported: "
                             "the causal conv ops apply silu")
        self.conv_dim = self.inter + 2 * self.n_groups * self.state_size
        self.in_proj = ReplicatedLinear(hidden, self.inter + self.conv_dim + self.num_heads,
                                        bias=use_bias)
        self.conv1d = _Conv1dParams(self.conv_dim, self.conv_width, use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.norm = MambaRMSNormGated(self.inter, self.inter // self.n_groups, eps)
        self.out_proj = ReplicatedLinear(self.inter, hidden, bias=use_bias)

    def cache_spec(self) -> StateSpec:
        return StateSpec(((self.conv_dim, self.conv_width - 1),
                          (self.num_heads, self.head_dim, self.state_size)),
                         (None, torch.float32))

    def _forward(self, impl, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        # hidden: [T, hidden_size] -> [T, hidden_size]
        self._check_cache(md)
        decode = md.max_query_len == 1
        T = hidden.shape[0]
        gate, xbc, dt = self.in_proj(hidden).split([self.inter, self.conv_dim, self.num_heads],
                                                   dim=-1)
        xbc = self._conv(impl, xbc.contiguous(), md, decode)
        gn = self.n_groups * self.state_size
        x, B, C = xbc.split([self.inter, gn, gn], dim=-1)
        x = x.contiguous().view(T, self.num_heads, self.head_dim)
        B = B.contiguous().view(T, self.n_groups, self.state_size)
        C = C.contiguous().view(T, self.n_groups, self.state_size)
        dt = dt.contiguous()
        A = -torch.exp(self.A_log.float())
        if decode:
            y = impl.ssd_state_update(self.ssm_states, x, dt, A, B, C, self.D, self.dt_bias, True,
                                      self.dt_limit, md.state_indices)
        else:
            y = impl.ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, self.D, self.dt_bias, True,
                                    self.dt_limit, self.ssm_states, md.query_start_loc,
                                    md.state_indices, md.has_initial_state)
        y = self.norm(y.reshape(T, self.inter), gate)
        return self.out_proj(y)
