"""OPT: learned positions offset by 2, LayerNorm before (most sizes) or after (350m:
do_layer_norm_before=False) each sublayer, a ReLU MLP (fc1/fc2), and project_in/project_out
between a narrower word embedding (word_embed_proj_dim) and the hidden size."""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.activation import get_act_fn
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                         ReplicatedLinear, RowParallelLinear)
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.layers.position import LearnedPositionEmbedding


class OPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        hd, bias = hidden // heads, getattr(config, "enable_bias", True)
        self.qkv_proj = QKVParallelLinear(hidden, hd, heads, heads, bias=bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias)
        self.q_size = self.qkv_proj.q_size
        self.attn = Attention(self.qkv_proj.num_heads, hd, hd ** -0.5)

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v, attn_metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = LayerNorm(hidden)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=bias)
        self.act = get_act_fn(config.activation_function)
        self.final_layer_norm = LayerNorm(hidden)

    def _sublayer(self, hidden, norm, fn):
        # pre-norm: x + f(norm(x)); post-norm: norm(x + f(x))
        if self.pre_norm:
            return hidden + fn(norm(hidden))
        return norm(hidden + fn(hidden))

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self._sublayer(hidden, self.self_attn_layer_norm,
                                lambda x: self.self_attn(x, attn_metadata))
        return self._sublayer(hidden, self.final_layer_norm,
                              lambda x: self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, word_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim)
        self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, hidden,
                                                        offset=2)
        projected = word_dim != hidden
        self.project_in = ReplicatedLinear(word_dim, hidden) if projected else None
        self.project_out = ReplicatedLinear(hidden, word_dim) if projected else None
        self.layers = StageLayers(config.num_hidden_layers, lambda i: OPTDecoderLayer(config))
        final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = LayerNorm(hidden) if final_norm else None

    def _embed(self, input_ids, positions) -> tuple[torch.Tensor]:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        return (hidden + self.embed_positions(positions),)

    def _finish(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        # a layer adds its own residual: only the hidden state [T, hidden] passes between stages
        return run_stage(self.layers, intermediate,
                         embed=lambda: self._embed(input_ids, positions),
                         step=lambda layer, state: (layer(state[0], attn_metadata),),
                         finish=lambda state: self._finish(state[0]))


class OPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        return self.decoder(input_ids, positions, attn_metadata, intermediate)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                              "v_proj": ("qkv_proj", "v")}

    def __init__(self, config):
        super().__init__()
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported: "
                             "octavo's LayerNorm always has a weight and bias")
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_to(self.model.decoder.embed_tokens)

    supports_pipeline_parallel = True
    pp_intermediate_tensors = 1          # the hidden state alone

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, word_embed_proj_dim] (on a pipeline
        # stage but the last: (hidden [T, hidden_size],))
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, word_embed_proj_dim] -> [N, vocab] float32
        return self.lm_head.compute_logits(hidden)
