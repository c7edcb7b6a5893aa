"""MiniCPM3: MiniCPM's muP scaling (models/minicpm.py) around DeepSeek-V2-style multi-head latent
attention (MLA): low-rank q (q_a_proj -> q_a_layernorm -> q_b_proj), one compressed kv latent
plus one shared rotary key (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj), and per head a
non-rotary part (qk_nope_head_dim) and a neox-rotary part (qk_rope_head_dim) of q and k.

The attention is models/layers/mla.py: the paged cache holds the latent and the rotary key per
token (kv_lora_rank + qk_rope_head_dim values), and attention runs in the latent space."""
from __future__ import annotations

from torch import nn

from octavo.models.layers.mla import MultiHeadLatentAttention
from octavo.models.llama import AttentionOptions
from octavo.models.minicpm import MiniCPMForCausalLM


class MiniCPM3ForCausalLM(MiniCPMForCausalLM):
    # q_proj (no q_lora) is a projection of its own here, not a shard of a fused qkv
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        return MultiHeadLatentAttention(config, rope_neox=True)
