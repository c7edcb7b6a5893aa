"""Jamba: a hybrid of attention layers (no position encoding) and Mamba-1 layers (with weighted
RMS norms on dt, B and C), each followed by a dense gated MLP or a sparse MoE (softmax top-k,
weights not renormalized). Attention layers use the paged KV cache, Mamba layers state slots.

Layer kinds come from `layers_block_type` ("attention" / "mamba") and experts per layer from
`layers_num_experts`, which transformers derives from attn/expert_layer_period and _offset.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.fused_moe import FusedMoE, MoEBlock, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import QKVParallelLinear, RowParallelLinear
from octavo.models.layers.mamba import MambaMixer
from octavo.models.llama import LlamaMLP, add_and_norm, head_dim_of


# layer type names: released checkpoints' and current transformers'
ATTENTION_KINDS, MAMBA_KINDS = ("attention", "full_attention"), ("mamba", "linear_attention")


def _layer_kinds(config) -> list[str]:
    kinds = list(getattr(config, "layers_block_type", None) or [])
    if len(kinds) != config.num_hidden_layers:
        period, offset = config.attn_layer_period, config.attn_layer_offset
        kinds = ["attention" if i % period == offset else "mamba"
                 for i in range(config.num_hidden_layers)]
    return kinds


def _num_experts(config, layer_idx: int) -> int:
    per_layer = getattr(config, "layers_num_experts", None)
    if per_layer:
        return per_layer[layer_idx]
    period, offset = config.expert_layer_period, config.expert_layer_offset
    return config.num_experts if layer_idx % period == offset else 1


class JambaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hd = head_dim_of(config)
        total_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads,
                                          total_kv, bias=False)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size,
                                        bias=False)
        self.attn = Attention(self.qkv_proj.num_heads, hd, hd ** -0.5, self.qkv_proj.num_kv_heads)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


def _mamba_mixer(config) -> MambaMixer:
    # the Mamba-1 mixer reads Mamba's config names
    names = SimpleNamespace(hidden_size=config.hidden_size,
                            intermediate_size=config.mamba_expand * config.hidden_size,
                            state_size=config.mamba_d_state, conv_kernel=config.mamba_d_conv,
                            time_step_rank=config.mamba_dt_rank, hidden_act=config.hidden_act,
                            use_bias=config.mamba_proj_bias, use_conv_bias=config.mamba_conv_bias)
    return MambaMixer(names, rms_norm_eps=config.rms_norm_eps, norm_weights=True)


class JambaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, kind: str, family):
        super().__init__()
        self.is_attention = kind in ATTENTION_KINDS
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_attention:
            self.self_attn = family.make_attention(config, layer_idx)
        elif kind in MAMBA_KINDS:
            self.mamba = family.make_mamba(config)
        else:
            raise ValueError(f"layer {layer_idx} has unknown type {kind!r} (expected one of "
                             f"{ATTENTION_KINDS + MAMBA_KINDS})")
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        experts = family.num_experts(config, layer_idx)
        if experts > 1:
            moe = FusedMoE(experts, config.num_experts_per_tok, config.hidden_size,
                           config.intermediate_size, renormalize=False,
                           activation=moe_activation(config.hidden_act))
            self.feed_forward = MoEBlock(config.hidden_size, moe)
        else:
            self.feed_forward = LlamaMLP(config)

    def forward(self, positions, hidden, residual, attn_metadata: AttentionMetadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        if self.is_attention:
            hidden = self.self_attn(positions, hidden, attn_metadata)
        else:
            hidden = self.mamba(hidden, attn_metadata)
        hidden, residual = self.pre_ff_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual


class JambaModel(nn.Module):
    def __init__(self, config, family):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(JambaDecoderLayer(config, i, kind, family)
                                    for i, kind in enumerate(family.layer_kinds(config)))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, attn_metadata):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
        hidden, _ = self.final_layernorm(hidden, residual)
        return hidden


class JambaForCausalLM(MoEWeightRouting, nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    checkpoint_renames = ((r"\.feed_forward\.router\.", ".feed_forward.gate."),)
    # tensor parallel: the Mamba mixers run whole on every rank (each rank keeps the whole
    # state), the rest is split; pipeline stages would each need the request's state slots
    supports_tensor_parallel = True
    pipeline_parallel_limit = "its Mamba layers keep a per-request state"
    # hooks of the hybrid families built on this decoder (Bamba)
    layer_kinds = staticmethod(_layer_kinds)
    num_experts = staticmethod(_num_experts)
    make_mamba = staticmethod(_mamba_mixer)

    @staticmethod
    def make_attention(config, layer_idx: int) -> nn.Module:
        return JambaAttention(config)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = JambaModel(config, type(self))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] int64 (no position encoding) -> hidden [T, H]
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
