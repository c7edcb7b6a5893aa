"""Granite 4.0 hybrid (GraniteMoeHybrid): Granite MoE Shared's decoder (muP multipliers, top-k
MoE beside a dense shared MLP) whose token mixer is, per `layer_types`, Llama attention (rotary
only when position_embedding_type is "rope") or a Mamba-2 mixer (checkpoint: layers.<i>.mamba)."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from octavo.models.bamba import mamba2_options
from octavo.models.granitemoe import _RENAMES, GraniteMoeSharedForCausalLM
from octavo.models.jamba import ATTENTION_KINDS, MAMBA_KINDS
from octavo.models.layers.custom_op import CustomOp
from octavo.models.layers.mamba import Mamba2Mixer
from octavo.models.llama import AttentionOptions, LlamaMLP


class _Mamba2Layer(Mamba2Mixer):
    """A Mamba-2 mixer in the attention's place: called with (positions, hidden, metadata)."""

    def forward(self, positions, hidden, attn_metadata):
        return CustomOp.forward(self, hidden, attn_metadata)


class _SharedMLPOnly(nn.Module):
    """num_local_experts == 0: the dense shared MLP alone (its checkpoint name kept)."""

    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared_expert = shared

    def forward(self, x):
        return self.shared_expert(x)


def _kind(config, layer_idx: int) -> str:
    kind = config.layer_types[layer_idx]
    if kind not in ATTENTION_KINDS + MAMBA_KINDS:
        raise ValueError(f"layer {layer_idx} has unknown type {kind!r} (expected one of "
                         f"{ATTENTION_KINDS + MAMBA_KINDS})")
    return "attention" if kind in ATTENTION_KINDS else "mamba"


class GraniteMoeHybridForCausalLM(GraniteMoeSharedForCausalLM):
    checkpoint_renames = ((r"\.mamba\.", ".self_attn."),) + _RENAMES
    # tensor parallel: the Mamba mixers run whole on every rank (each rank keeps the whole
    # state), the rest is split; pipeline stages would each need the request's state slots
    supports_tensor_parallel = True
    pipeline_parallel_limit = "its Mamba layers keep a per-request state"
    supports_pipeline_parallel = False

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        opts = GraniteMoeSharedForCausalLM.attention_options(config, layer_idx)
        return replace(opts, rope=getattr(config, "position_embedding_type", None) == "rope")

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        if _kind(config, opts.layer_idx) == "attention":
            return super().make_attention(config, opts)
        return _Mamba2Layer(config, **mamba2_options(config))

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        if getattr(config, "num_local_experts", 0) > 0:
            return super().make_mlp(config, layer_idx)
        return _SharedMLPOnly(LlamaMLP(config, intermediate_size=config.shared_intermediate_size))
