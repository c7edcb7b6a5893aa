"""DeepSeek-V3's multi-token-prediction layer as a speculative-decoding head (method "mtp").

V3 checkpoints hold num_nextn_predict_layers MTP layers after the model's own, named
model.layers.<num_hidden_layers + i>.*: a decoder layer (MLA + MoE) plus enorm, hnorm,
eh_proj, shared_head.norm / shared_head.head and embed_tokens. Position j reads token j + 1 and
the target's final hidden state at j: x = eh_proj([enorm(embed(token)); hnorm(feature)]), the
decoder layer, and logits = head(norm(output)); the embedding of position 0 is zeroed (as vLLM
does). The first MTP layer drafts every token, each draft's output being the next feature.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.fused_moe import MoEWeightRouting
from octavo.models.registry import get_model_class


def _mtp_layer_cls(family):
    class MTPLayer(family.decoder_layer_cls):
        def __init__(self, config, index: int):
            opts = replace(family.attention_options(config, index), layer_idx=index)
            super().__init__(config, opts, family)
            h = config.hidden_size
            self.enorm = family.make_norm(config, h)
            self.hnorm = family.make_norm(config, h)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h)
            self.embed_tokens.weight.optional = True        # else the target's
            self.shared_head = nn.Module()
            self.shared_head.norm = family.make_norm(config, h)
            self.shared_head.head = ParallelLMHead(config.vocab_size, h)
            self.shared_head.head.weight.optional = True    # else the target's LM head
    return MTPLayer


class DeepSeekMTP(MoEWeightRouting, nn.Module):
    def __init__(self, config):
        super().__init__()
        family = get_model_class(config)
        if not getattr(config, "num_nextn_predict_layers", 0):
            raise ValueError("this checkpoint has no multi-token-prediction layers "
                             "(num_nextn_predict_layers is 0): use another speculative method")
        self.config = config
        self.family = family
        self.checkpoint_renames = family.checkpoint_renames
        self.packed_modules_mapping = family.packed_modules_mapping
        self.index = config.num_hidden_layers
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(self.index): _mtp_layer_cls(family)(config,
                                                                                  self.index)})
        self.features: torch.Tensor | None = None

    @property
    def layer(self):
        return self.model.layers[str(self.index)]

    def share_from(self, target: nn.Module) -> None:
        """Use the target's embedding / LM head where the checkpoint has none for the layer."""
        loaded = getattr(self, "loaded_parameter_names", set())
        prefix = f"model.layers.{self.index}."
        if prefix + "embed_tokens.weight" not in loaded:
            self.layer.embed_tokens = target.model.embed_tokens
        if prefix + "shared_head.head.weight" not in loaded:
            self.layer.shared_head.head = target.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        feats = self.features
        if feats is None or feats.shape[0] != input_ids.shape[0]:
            raise RuntimeError("MTP needs one target feature per input token")
        layer = self.layer
        e = layer.embed_tokens(input_ids).masked_fill((positions == 0).unsqueeze(-1), 0)
        x = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(feats.to(e.dtype))], -1))
        h, residual = layer(positions, x, None, attn_metadata)
        return h + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.layer.shared_head
        return head.head.compute_logits(head.norm(hidden))
