"""Mamba-2 (Mamba-Codestral, mamba2-*): Mamba's pre-RMSNorm blocks around a Mamba-2 (SSD)
mixer with multi-head states, grouped B/C and a gated group RMSNorm before out_proj."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.mamba import Mamba2Mixer
from octavo.models.mamba import MambaForCausalLM


class Mamba2ForCausalLM(MambaForCausalLM):
    @staticmethod
    def make_mixer(config, layer_idx: int) -> nn.Module:
        return Mamba2Mixer(config)
