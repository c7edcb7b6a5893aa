"""RMSNorm (with the fused residual add of vLLM) and LayerNorm.

`norm(x)` -> normalized x; `norm(x, residual)` -> (normalized(x + residual), x + residual), which
lets a decoder layer carry the residual stream without a separate add.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _forward(self, impl, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x: [..., H] (flattened to [T, H] for the kernels); residual: same shape or None
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if residual is None:
            return impl.rms_norm(x2.contiguous(), self.weight, self.eps).view(shape)
        if not x.is_contiguous() or not residual.is_contiguous():
            x2, residual = x2.contiguous(), residual.contiguous()
        r2 = residual.view(-1, self.hidden_size)
        impl.fused_add_rms_norm(x2, r2, self.weight, self.eps)  # in place on both
        return x2.view(shape), r2.view(shape)

    def forward_ops(self, x, residual=None):
        return self._forward(ops, x, residual)

    def forward_native(self, x, residual=None):
        return self._forward(ops_native, x, residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with optional bias and the same residual convention as RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            x = residual
        out = F.layer_norm(x.float(), (self.hidden_size,), self.weight.float(),
                           None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)
        return out if residual is None else (out, residual)

    forward_native = forward

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"
