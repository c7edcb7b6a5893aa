"""Bamba (IBM): Jamba's hybrid decoder with Mamba-2 mixers, Llama attention with rotary on half
of each head (partial_rotary_factor 0.5) at `attn_layer_indices`, and a dense gated MLP on
every layer."""
from __future__ import annotations

from torch import nn

from octavo.models.jamba import JambaForCausalLM
from octavo.models.layers.mamba import Mamba2Mixer
from octavo.models.llama import AttentionOptions, LlamaAttention


def mamba2_options(config) -> dict:
    """The Mamba2Mixer arguments from the mamba_* fields of Bamba and Granite 4.0 configs."""
    return dict(num_heads=config.mamba_n_heads, head_dim=config.mamba_d_head,
                n_groups=config.mamba_n_groups, state_size=config.mamba_d_state,
                conv_kernel=config.mamba_d_conv, chunk_size=config.mamba_chunk_size,
                intermediate_size=int(config.mamba_expand * config.hidden_size),
                use_bias=config.mamba_proj_bias, use_conv_bias=config.mamba_conv_bias,
                norm_eps=config.rms_norm_eps, time_step_limit=config.time_step_limit)


class BambaForCausalLM(JambaForCausalLM):
    @staticmethod
    def layer_kinds(config) -> list[str]:
        attn = set(getattr(config, "attn_layer_indices", None) or [])
        return ["attention" if i in attn else "mamba" for i in range(config.num_hidden_layers)]

    @staticmethod
    def num_experts(config, layer_idx: int) -> int:
        return 1

    @staticmethod
    def make_mamba(config) -> nn.Module:
        return Mamba2Mixer(config, **mamba2_options(config))

    @staticmethod
    def make_attention(config, layer_idx: int) -> nn.Module:
        opts = AttentionOptions(qkv_bias=getattr(config, "attention_bias", False),
                                o_bias=getattr(config, "attention_bias", False),
                                layer_idx=layer_idx)
        return LlamaAttention(config, opts)
