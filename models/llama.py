"""Llama and Mistral, and the shared decoder of the Llama-like families.

A family is a subclass of LlamaForCausalLM that overrides a few hooks (staticmethods):
  attention_options(config, layer_idx)  per-layer attention: biases, q/k norm, sliding window,
                                        scale, logit soft-cap, rotary on/off and style
  make_norm(config, size)               the norm (RMSNorm; Gemma's (1 + w); Cohere's LayerNorm)
  make_qk_norm(config, heads, head_dim) the q/k norm over [T, heads * head_dim] (default: per head)
  norm_names                            which norms sit around attention and MLP, by checkpoint name
  mlp_options(config)                   (hidden_act, bias) of the gated MLP
  scale_embeddings(config, hidden)      Gemma's sqrt(hidden), Granite's embedding_multiplier
  residual_scale(config)                multiplier on each block's output (Granite)
  make_attention(config, opts)          the attention module (MiniCPM3's MLA replaces LlamaAttention)
  make_mlp(config, layer_idx)           the MLP module of a layer (MoE families: a sparse MoE block,
                                        dense on the layers their config keeps dense)
  decoder_layer_cls                     the layer class (Cohere's parallel block overrides forward)
and compute_logits where a family scales or soft-caps the logits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from octavo.models.layers.activation import get_gated_activation
from octavo.models.layers import decoder_plan
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.longrope import LongRoPEScaledRotaryEmbedding
from octavo.models.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                         RowParallelLinear)
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.layers.rotary import get_rope, rope_parameters


@dataclass
class AttentionOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False                 # q/k norm before rotary (Qwen3, Gemma3, OLMo2, Cohere)
    sliding_window: int | None = None
    scale: float | None = None            # None: head_dim ** -0.5
    logit_soft_cap: float | None = None   # Gemma2: cap * tanh(logits / cap)
    rope: bool = True                     # False: no rotary on this layer (NoPE, SmolLM3)
    rope_neox: bool = True                # False: GPT-J pairs (2i, 2i+1) (GLM4, Ernie4.5, Cohere)
    rope_layer_type: str = "full_attention"  # which per-layer-type rope_parameters (Gemma3 local)
    clip_qkv: float | None = None         # clamp q, k, v to [-c, c] after the q/k norm (DBRX, OLMoE)
    layer_idx: int = 0                    # set by LlamaModel: the layer these options are for


@dataclass(frozen=True)
class NormNames:
    """Checkpoint names of the norms before/after attention and MLP; None where there is none."""
    pre_attn: str | None = "input_layernorm"
    post_attn: str | None = None
    pre_mlp: str | None = "post_attention_layernorm"
    post_mlp: str | None = None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_and_norm(norm, hidden: torch.Tensor, residual: torch.Tensor | None):
    """(norm(hidden + residual), hidden + residual); the first layer has no residual yet.
    Without a norm (OLMo2 has no pre-norms) the sum itself is the next input."""
    if norm is None:
        residual = hidden if residual is None else hidden + residual
        return residual, residual
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)


class LlamaAttention(nn.Module):
    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__()
        family = family or LlamaForCausalLM
        tp = get_tp_size()
        self.head_dim = hd = head_dim_of(config)
        total_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads,
                                          total_kv, bias=opts.qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(self.num_heads * tp * hd, config.hidden_size,
                                        bias=opts.o_bias)
        self.rotary_emb = self._rope(config, opts, hd) if opts.rope else None
        scale = hd ** -0.5 if opts.scale is None else opts.scale
        self.attn = Attention(self.num_heads, hd, scale, self.num_kv_heads,
                              sliding_window=opts.sliding_window,
                              logit_soft_cap=opts.logit_soft_cap)
        if opts.qk_norm:
            self.q_norm = family.make_qk_norm(config, self.num_heads, hd)
            self.k_norm = family.make_qk_norm(config, self.num_kv_heads, hd)
        self.qk_norm = opts.qk_norm
        self.clip_qkv = opts.clip_qkv

    @staticmethod
    def _rope(config, opts: AttentionOptions, hd: int):
        base, scaling = rope_parameters(config, opts.rope_layer_type)
        partial = (scaling or {}).get("partial_rotary_factor",
                                      getattr(config, "partial_rotary_factor", 1.0))
        return get_rope(hd, int(hd * partial), config.max_position_embeddings, base,
                        is_neox_style=opts.rope_neox, rope_scaling=scaling)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hk) * hd]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # before rotary; [T, H * hd] in and out
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool = False, hidden_act: str | None = None,
                 intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act_fn = get_gated_activation(hidden_act or getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__()
        family = family or LlamaForCausalLM
        self.self_attn = family.make_attention(config, opts)
        self.mlp = family.make_mlp(config, opts.layer_idx)
        self.norm_names = family.norm_names
        for name in vars(self.norm_names).values():
            if name is not None:
                self.add_module(name, family.make_norm(config, config.hidden_size))
        self.residual_scale = family.residual_scale(config)

    def _norm(self, slot: str):
        name = getattr(self.norm_names, slot)
        return None if name is None else getattr(self, name)

    def _finish(self, out: torch.Tensor, slot: str) -> torch.Tensor:
        # a block's output: post-norm (Gemma, GLM4, OLMo2) and residual multiplier (Granite)
        norm = self._norm(slot)
        out = out if norm is None else norm(out)
        return out if self.residual_scale == 1.0 else out * self.residual_scale

    def forward(self, positions, hidden, residual, attn_metadata):
        hidden, residual = add_and_norm(self._norm("pre_attn"), hidden, residual)
        hidden = self._finish(self.self_attn(positions, hidden, attn_metadata), "post_attn")
        hidden, residual = add_and_norm(self._norm("pre_mlp"), hidden, residual)
        return self._finish(self.mlp(hidden), "post_mlp"), residual


class LlamaModel(nn.Module):
    """Pipeline parallelism (models/layers/pipeline.py): a stage builds only layers
    [start_layer, end_layer); every stage keeps the embedding, final norm and LM head (the last
    stage needs the embedding when the head is tied). forward takes the previous stage's
    (hidden, residual) and, except on the last stage, returns them."""

    def __init__(self, config, family=None):
        super().__init__()
        self.family = family = family or LlamaForCausalLM
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = StageLayers(config.num_hidden_layers, lambda i: family.decoder_layer_cls(
            config, replace(family.attention_options(config, i), layer_idx=i), family))
        self.start_layer, self.end_layer = self.layers.start_layer, self.layers.end_layer
        self.norm = family.make_norm(config, config.hidden_size)
        # LongRoPE (Phi-3, MiniCPM): one rotary module shared by all layers, whose cache has a
        # short and a long table; each sequence's tokens read the table its length selects.
        self.longrope = next((m for m in self.modules()
                              if isinstance(m, LongRoPEScaledRotaryEmbedding)), None)

    @property
    def stage_layers(self) -> list[nn.Module]:
        """The layers this pipeline stage holds (all of them without pipeline parallelism)."""
        return self.layers.held()

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        if self.longrope is not None:
            positions = self.longrope.rope_positions(positions, attn_metadata.query_start_loc,
                                                     attn_metadata.seq_lens)
        plan = decoder_plan.plan_for(self, positions)
        md = attn_metadata
        return run_stage(
            self.layers, intermediate,
            embed=lambda: (self.family.scale_embeddings(self.config, self.embed_tokens(input_ids)),
                           None),
            step=lambda layer, state: layer(positions, *state, attn_metadata),
            finish=lambda state: add_and_norm(self.norm, *state)[0],
            all_layers=None if plan is None else lambda state: plan.run(
                *state, positions, md.slot_mapping, md.query_start_loc, md.seq_lens,
                md.block_table))


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (fused module name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    norm_names = NormNames()
    decoder_layer_cls = LlamaDecoderLayer

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, type(self))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions) -> nn.Module:
        return LlamaAttention(config, opts, cls)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        hidden_act, bias = cls.mlp_options(config)
        return LlamaMLP(config, bias=bias, hidden_act=hidden_act)

    @staticmethod
    def make_norm(config, size: int) -> nn.Module:
        return RMSNorm(size, eps=config.rms_norm_eps)

    @classmethod
    def make_qk_norm(cls, config, num_heads: int, head_dim: int) -> nn.Module:
        # one norm of head_dim applied to every head (RMSNorm views [T, H*hd] as [T*H, hd])
        return cls.make_norm(config, head_dim)

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        return getattr(config, "hidden_act", "silu"), getattr(config, "mlp_bias", False)

    @staticmethod
    def scale_embeddings(config, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @staticmethod
    def residual_scale(config) -> float:
        return 1.0

    supports_pipeline_parallel = True
    pp_intermediate_tensors = 2          # (hidden, residual) between pipeline stages

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] (on a pipeline stage but
        # the last: (hidden, residual), both [T, hidden_size])
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab] float32
        return self.lm_head.compute_logits(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        opts = LlamaForCausalLM.attention_options(config, layer_idx)
        opts.sliding_window = getattr(config, "sliding_window", None)
        return opts
