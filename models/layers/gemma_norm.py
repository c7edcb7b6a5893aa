"""Gemma's RMSNorm: the checkpoint stores w and the scale is (1 + w).

The parameter holds the effective scale (1 + w), added once at load time, so the RMSNorm
kernels (plain and fused with the residual add) run unchanged. A fresh module scales by 1,
which is (1 + w) for Gemma's zero-initialised w.
"""
from __future__ import annotations

import torch

from octavo.models.layers.layernorm import RMSNorm


class GemmaRMSNorm(RMSNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id=None) -> None:
        if loaded_weight.shape != param.shape:
            raise ValueError(f"norm weight of shape {tuple(loaded_weight.shape)} does not match "
                             f"{tuple(param.shape)}")
        param.data.copy_(loaded_weight.float() + 1.0)  # (1 + w) in fp32, then the param's dtype
