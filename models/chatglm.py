"""ChatGLM2 / ChatGLM3 / GLM-4 (remote code, `ChatGLMModel`): pre-norm RMSNorm blocks with q|k|v
fused in query_key_value (multi_query_group_num kv heads, or per-head interleaved without
multi-query attention), rotary on the first half of each head in GPT-J pairs (base
10000 * rope_ratio), a SwiGLU MLP fused in dense_h_to_4h, and an untied output_layer."""
from __future__ import annotations

import torch
from torch import nn

from octavo.models.layers.activation import get_gated_activation
from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.checkpoint_layouts import load_interleaved_qkv
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                         RowParallelLinear)
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.layers.rotary import get_rope
from octavo.models.llama import add_and_norm


def _check_supported(config) -> None:
    if getattr(config, "position_encoding_2d", False):
        raise ValueError("this is a first-generation ChatGLM-6B checkpoint (2-D position "
                         "encoding); octavo supports ChatGLM2/3 and GLM-4 ChatGLMModel checkpoints")
    if getattr(config, "vision_config", None) is not None:
        raise ValueError("GLM-4V (a ChatGLMModel with a vision_config) is not supported; octavo "
                         "runs the text-only ChatGLM2/3 and GLM-4 checkpoints")
    missing = [f for f in ("num_layers", "padded_vocab_size", "kv_channels", "ffn_hidden_size",
                           "layernorm_epsilon") if not hasattr(config, f)]
    if missing:
        raise ValueError(f"ChatGLMModel config lacks {', '.join(missing)}; is this a ChatGLM2/3 "
                         "or GLM-4 checkpoint?")
    for field, value in (("rmsnorm", True), ("post_layer_norm", True),
                         ("apply_residual_connection_post_layernorm", False)):
        if getattr(config, field, value) != value:
            raise ValueError(f"ChatGLM with {field}={getattr(config, field)} is not supported "
                             f"(only {field}={value}, as in every released checkpoint)")


class ChatGLMAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads, hd = config.num_attention_heads, config.kv_channels
        multi_query = getattr(config, "multi_query_attention", False)
        kv_heads = config.multi_query_group_num if multi_query else heads
        self.query_key_value = QKVParallelLinear(config.hidden_size, hd, heads, kv_heads,
                                                 bias=getattr(config, "add_qkv_bias", False))
        if not multi_query:  # [head, (q|k|v), hd] on the output dim
            load_interleaved_qkv(self.query_key_value, heads, hd)
        qkv = self.query_key_value
        self.q_size, self.kv_size = qkv.q_size, qkv.kv_size
        self.dense = RowParallelLinear(heads * hd, config.hidden_size,
                                       bias=getattr(config, "add_bias_linear", False))
        base = 10000.0 * getattr(config, "rope_ratio", 1.0)
        self.rotary_emb = get_rope(hd, hd // 2, getattr(config, "seq_length", 8192), base,
                                   is_neox_style=False)
        self.attn = Attention(qkv.num_heads, hd, hd ** -0.5, qkv.num_kv_heads)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.query_key_value(hidden)  # [T, (Hq + 2 Hk) * hd]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v, attn_metadata))


class ChatGLMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        ffn, bias = config.ffn_hidden_size, getattr(config, "add_bias_linear", False)
        self.dense_h_to_4h = MergedColumnParallelLinear(config.hidden_size, [ffn, ffn], bias=bias)
        self.act_fn = get_gated_activation("silu")  # silu(first half) * second half
        self.dense_4h_to_h = RowParallelLinear(ffn, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act_fn(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.self_attention = ChatGLMAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.mlp = ChatGLMMLP(config)

    def forward(self, positions, hidden, residual, attn_metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attention(positions, hidden, attn_metadata)
        hidden, residual = add_and_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(hidden), residual


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = StageLayers(config.num_layers, lambda i: GLMBlock(config))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, positions, embed, attn_metadata, intermediate=None):
        # embed() -> the token embeddings, run on the first pipeline stage only
        return run_stage(self.layers, intermediate, embed=lambda: (embed(), None),
                         step=lambda layer, state: layer(positions, *state, attn_metadata),
                         finish=lambda state: add_and_norm(self.final_layernorm, *state)[0])


class ChatGLMEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMTransformerModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding = ChatGLMEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = ParallelLMHead(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        return self.encoder(positions, lambda: self.embedding(input_ids), attn_metadata,
                            intermediate)


class ChatGLMModel(nn.Module):
    supports_pipeline_parallel = True
    pp_intermediate_tensors = 2          # (hidden, residual)
    pp_layers_config_key = "num_layers"

    def __init__(self, config):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.transformer = ChatGLMTransformerModel(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] (on a pipeline stage but
        # the last: (hidden, residual))
        return self.transformer(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, padded_vocab_size] float32
        return self.transformer.output_layer.compute_logits(hidden)
