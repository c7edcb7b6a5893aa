"""EAGLE-1 draft head for Llama-family targets (speculative decoding; not a model on its own).

Position i of the draft reads the token at i + 1 and the target's final hidden state at i:
x = fc([embed(token); feature]), then Llama decoder layers (the first without its input norm),
and the output, a guess of the target's next feature, goes through the target's LM head. The
checkpoint names are the EAGLE repository's: fc.weight, layers.N.*, and embed_tokens.weight
when the head has an embedding of its own (else it shares the target's).
"""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.embedding import VocabParallelEmbedding
from octavo.models.llama import LlamaForCausalLM, NormNames


class _FirstLayerFamily(LlamaForCausalLM):
    norm_names = NormNames(pre_attn=None)       # EAGLE's first layer has no input norm


class EagleLlamaForCausalLM(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h)
        self.embed_tokens.weight.optional = True    # without one the head shares the target's
        self.fc = nn.Linear(2 * h, h, bias=bool(getattr(config, "bias", False)))
        self.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            family = _FirstLayerFamily if i == 0 else LlamaForCausalLM
            opts = family.attention_options(config, i)
            opts.layer_idx = i
            self.layers.append(family.decoder_layer_cls(config, opts, family))
        self.lm_head = None                 # the target's (set by the proposer)
        self.features: torch.Tensor | None = None   # [T, hidden] for the next forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        feats = self.features
        if feats is None or feats.shape[0] != input_ids.shape[0]:
            raise RuntimeError("EAGLE needs one target feature per input token")
        x = self.fc(torch.cat([self.embed_tokens(input_ids), feats.to(self.fc.weight.dtype)], -1))
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn_metadata)
        return x + residual

    def share_from(self, target: nn.Module) -> None:
        """The target's LM head, and its embedding when the checkpoint has none."""
        if "embed_tokens.weight" not in getattr(self, "loaded_parameter_names", set()):
            self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
