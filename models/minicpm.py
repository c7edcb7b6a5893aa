"""MiniCPM (remote code): the Llama decoder with muP scaling: embeddings times scale_emb, each
block's output times scale_depth / sqrt(num_hidden_layers) before the residual add, and the final
hidden state divided by hidden_size / dim_model_base before the (usually tied) lm_head. LongRoPE
scaling (MiniCPM3, MiniCPM4) picks the short or long table per sequence as Phi-3 does."""
from __future__ import annotations

import math

import torch

from octavo.models.llama import LlamaForCausalLM


class MiniCPMForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        if getattr(config, "num_experts", 0):
            raise ValueError("MiniCPM mixture-of-experts checkpoints (num_experts > 0) are not "
                             "supported; use a dense MiniCPM")
        if not hasattr(config, "tie_word_embeddings"):  # MiniCPMConfig's default
            config.tie_word_embeddings = True
        super().__init__(config)

    @staticmethod
    def scale_embeddings(config, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * config.scale_emb

    @staticmethod
    def residual_scale(config) -> float:
        return config.scale_depth / math.sqrt(config.num_hidden_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        width = self.config.hidden_size / self.config.dim_model_base
        return super().compute_logits(hidden / width)
