"""BLOOM: ALiBi instead of positions (slopes per head, added in the attention kernel), a
LayerNorm on the word embeddings, q/k/v fused and interleaved per head in query_key_value,
and a tanh-gelu MLP. apply_residual_connection_post_layernorm takes the residual after the norm."""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.activation import get_act_fn
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.checkpoint_layouts import load_interleaved_qkv
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import LayerNorm
from octavo.models.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.layers.position import alibi_slopes_for_rank


class BloomAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        hd = hidden // heads
        self.query_key_value = QKVParallelLinear(hidden, hd, heads, heads, bias=True)
        load_interleaved_qkv(self.query_key_value, heads, hd)
        self.dense = RowParallelLinear(hidden, hidden, bias=True)
        self.q_size = self.query_key_value.q_size
        self.attn = Attention(self.query_key_value.num_heads, hd, hd ** -0.5,
                              alibi_slopes=alibi_slopes_for_rank(heads))

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden).split([self.q_size] * 3, dim=-1)
        return self.dense(self.attn(q, k, v, attn_metadata))


class BloomMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(hidden, 4 * hidden, bias=True)
        self.gelu = get_act_fn("gelu_pytorch_tanh")
        self.dense_4h_to_h = RowParallelLinear(4 * hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.mlp = BloomMLP(config)
        self.residual_after_norm = getattr(config, "apply_residual_connection_post_layernorm", False)

    def _sublayer(self, hidden, norm, fn):
        normed = norm(hidden)
        return (normed if self.residual_after_norm else hidden) + fn(normed)

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self._sublayer(hidden, self.input_layernorm,
                                lambda x: self.self_attention(x, attn_metadata))
        return self._sublayer(hidden, self.post_attention_layernorm, self.mlp)


class BloomModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.h = StageLayers(config.num_hidden_layers, lambda i: BloomBlock(config))
        self.ln_f = LayerNorm(config.hidden_size, eps=eps)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        # positions are unused: ALiBi needs only each key's distance to the query. A block adds
        # its own residual, so only the hidden state passes between pipeline stages.
        return run_stage(
            self.h, intermediate,
            embed=lambda: (self.word_embeddings_layernorm(self.word_embeddings(input_ids)),),
            step=lambda block, state: (block(state[0], attn_metadata),),
            finish=lambda state: self.ln_f(state[0]))


class BloomForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_to(self.transformer.word_embeddings)

    supports_pipeline_parallel = True
    pp_intermediate_tensors = 1          # the hidden state alone

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] (on a pipeline stage but
        # the last: (hidden,))
        return self.transformer(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab] float32
        return self.lm_head.compute_logits(hidden)
