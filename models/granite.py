"""Granite (3.x dense): the Llama decoder with muP-style multipliers: embeddings times
embedding_multiplier, attention scale attention_multiplier, each block's output times
residual_multiplier before the residual add, logits divided by logits_scaling."""
from __future__ import annotations

import torch

from octavo.models.llama import AttentionOptions, LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, scale=config.attention_multiplier)

    @staticmethod
    def scale_embeddings(config, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * config.embedding_multiplier

    @staticmethod
    def residual_scale(config) -> float:
        return float(config.residual_multiplier)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.config.logits_scaling
