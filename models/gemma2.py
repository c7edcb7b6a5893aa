"""Gemma 2: the Llama decoder with (1 + w) RMSNorms before and after attention and MLP,
embeddings scaled by sqrt(hidden_size), attention scaled by query_pre_attn_scalar ** -0.5,
tanh soft-capping of attention and final logits, and sliding-window layers per `layer_types`."""
from __future__ import annotations

import torch

from octavo.models.layers.gemma_norm import GemmaRMSNorm
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, NormNames


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else cap * torch.tanh(logits / cap)


def is_sliding(config, layer_idx: int) -> bool:
    return config.layer_types[layer_idx] == "sliding_attention"


class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_names = NormNames("input_layernorm", "post_attention_layernorm",
                           "pre_feedforward_layernorm", "post_feedforward_layernorm")

    def __init__(self, config):
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{type(self).__name__} with use_bidirectional_attention=True (an "
                             "embedding model) is not supported: octavo runs causal decoders")
        super().__init__(config)

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(
            qkv_bias=bias, o_bias=bias, scale=config.query_pre_attn_scalar ** -0.5,
            logit_soft_cap=config.attn_logit_softcapping,
            sliding_window=config.sliding_window if is_sliding(config, layer_idx) else None)

    @staticmethod
    def make_norm(config, size: int) -> GemmaRMSNorm:
        return GemmaRMSNorm(size, eps=config.rms_norm_eps)

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        return act or "gelu_pytorch_tanh", False

    @staticmethod
    def scale_embeddings(config, hidden: torch.Tensor) -> torch.Tensor:
        # the normalizer is rounded to the model dtype, as in transformers
        return hidden * torch.tensor(config.hidden_size ** 0.5, dtype=hidden.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(super().compute_logits(hidden), self.config.final_logit_softcapping)
