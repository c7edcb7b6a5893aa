"""MiniCPM3: MiniCPM's muP scaling (models/minicpm.py) around DeepSeek-V2-style multi-head latent
attention (MLA): low-rank q (q_a_proj -> q_a_layernorm -> q_b_proj), one compressed kv latent
plus one shared rotary key (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj), and per head a
non-rotary part (qk_nope_head_dim) and a neox-rotary part (qk_rope_head_dim) of q and k.

The paged cache holds one head size for K and V, so the latent is decompressed before caching:
K = [k_nope | k_rope] per head, V zero-padded to the same size; the padding columns of the
attention output are dropped before o_proj. (vLLM caches the latent itself; that needs an MLA
kernel.)"""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.layers.rotary import get_rope, rope_parameters
from octavo.models.llama import AttentionOptions
from octavo.models.minicpm import MiniCPMForCausalLM


class MiniCPM3Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = getattr(config, "v_head_dim", None) or hidden // total_heads
        self.kv_lora = config.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        self.num_heads = total_heads // get_tp_size()
        self.head_size = max(qk_dim, self.v_dim)   # one size for the cached K and V
        q_lora, eps = getattr(config, "q_lora_rank", None), config.rms_norm_eps
        if q_lora:
            self.q_a_proj = ReplicatedLinear(hidden, q_lora)
            self.q_a_layernorm = RMSNorm(q_lora, eps=eps)
            self.q_b_proj = ColumnParallelLinear(q_lora, total_heads * qk_dim)
        else:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * qk_dim)
        self.q_lora = q_lora
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, eps=eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora, total_heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden)
        base, scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.rope_dim, self.rope_dim, config.max_position_embeddings,
                                   base, is_neox_style=True, rope_scaling=scaling)
        self.attn = Attention(self.num_heads, self.head_size, qk_dim ** -0.5, self.num_heads)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # [T, H, d] -> [T, H, head_size], zeros after d (they add nothing to q.k and are dropped
        # from the output)
        return nn.functional.pad(x, (0, self.head_size - x.shape[-1]))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        T, H = hidden.shape[0], self.num_heads
        q = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))) if self.q_lora
             else self.q_proj(hidden)).view(T, H, self.nope + self.rope_dim)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora, self.rope_dim], -1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)      # [T, H, nope], [T, H, v]
        q_rope = q[..., self.nope:].reshape(T, H * self.rope_dim)  # copies: rotated in place
        k_rope = k_rope.contiguous()                               # [T, rope]: one shared head
        q_rope, k_rope = self.rotary_emb(positions, q_rope, k_rope)
        q = torch.cat([q[..., :self.nope], q_rope.view(T, H, self.rope_dim)], dim=-1)
        k = torch.cat([k_nope, k_rope.view(T, 1, self.rope_dim).expand(T, H, self.rope_dim)], -1)
        out = self.attn(self._pad(q).reshape(T, -1), self._pad(k).reshape(T, -1),
                        self._pad(v).reshape(T, -1), attn_metadata)
        return self.o_proj(out.view(T, H, self.head_size)[..., :self.v_dim].reshape(T, -1))


class MiniCPM3ForCausalLM(MiniCPMForCausalLM):
    # q_proj (no q_lora) is a projection of its own here, not a shard of a fused qkv
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        return MiniCPM3Attention(config)
