"""Mamba (attention-free, selective state space) and Falcon-Mamba (the same with weightless RMS
norms on dt, B and C): pre-RMSNorm blocks around a Mamba-1 mixer, the residual stream in fp32
when `residual_in_fp32`, and a head tied to the embedding unless the config says otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.mamba import MambaMixer


class MambaBlock(nn.Module):
    def __init__(self, config, mixer: nn.Module):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = mixer

    def forward(self, hidden, residual, attn_metadata: AttentionMetadata, residual_dtype):
        # residual: the running sum of the block outputs (None before the first block)
        residual = hidden.to(residual_dtype) if residual is None else residual + hidden
        return self.mixer(self.norm(residual.to(hidden.dtype)), attn_metadata), residual


class MambaModel(nn.Module):
    def __init__(self, config, make_mixer):
        super().__init__()
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config, make_mixer(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.residual_in_fp32 = getattr(config, "residual_in_fp32", True)

    def forward(self, input_ids, attn_metadata):
        hidden = self.embeddings(input_ids)
        dtype = torch.float32 if self.residual_in_fp32 else hidden.dtype
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, attn_metadata, dtype)
        return self.norm_f((residual + hidden).to(hidden.dtype))


class MambaForCausalLM(nn.Module):
    # tensor parallel: the Mamba mixers run whole on every rank (each rank keeps the whole
    # state), the rest is split; pipeline stages would each need the request's state slots
    supports_tensor_parallel = True
    pipeline_parallel_limit = "its Mamba layers keep a per-request state"

    @staticmethod
    def make_mixer(config, layer_idx: int) -> nn.Module:
        return MambaMixer(config)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = MambaModel(config, self.make_mixer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_to(self.backbone.embeddings)

    def route_weight(self, name: str):
        # checkpoints converted before transformers renamed it call the embedding 'embedding'
        if name == "backbone.embedding.weight":
            return "backbone.embeddings.weight", None
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] int64 (positions unused: no position encoding) -> [T, H]
        return self.backbone(input_ids, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)


class FalconMambaForCausalLM(MambaForCausalLM):
    @staticmethod
    def make_mixer(config, layer_idx: int) -> nn.Module:
        return MambaMixer(config, rms_norm_eps=getattr(config, "mixer_rms_eps", 1e-6))
