"""InternLM2 (remote code): the Llama decoder under the checkpoint's own names (tok_embeddings,
attention.wqkv / wo, feed_forward.w1 / w3 / w2, attention_norm / ffn_norm, output), with q/k/v
packed per kv-head group in wqkv and the `bias` field on wqkv and wo."""
from __future__ import annotations

from octavo.models.layers.checkpoint_layouts import load_grouped_qkv
from octavo.models.llama import (AttentionOptions, LlamaDecoderLayer, LlamaForCausalLM, NormNames,
                                 add_and_norm)


class InternLM2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__(config, opts, family)
        self.attention = self._modules.pop("self_attn")  # the checkpoint's module names
        self.feed_forward = self._modules.pop("mlp")
        qkv = self.attention.qkv_proj
        load_grouped_qkv(qkv, qkv.total_num_heads, qkv.total_num_kv_heads, qkv.head_size)

    def forward(self, positions, hidden, residual, attn_metadata):
        hidden, residual = add_and_norm(self.attention_norm, hidden, residual)
        hidden = self.attention(positions, hidden, attn_metadata)
        hidden, residual = add_and_norm(self.ffn_norm, hidden, residual)
        return self.feed_forward(hidden), residual


class InternLM2ForCausalLM(LlamaForCausalLM):
    # checkpoint name part -> (octavo module, shard id); None: the whole fused tensor
    packed_modules_mapping = {
        "tok_embeddings": ("embed_tokens", None),
        "wqkv": ("qkv_proj", None),
        "wo": ("o_proj", None),
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", None),
        "output": ("lm_head", None),
    }
    norm_names = NormNames("attention_norm", None, "ffn_norm", None)
    decoder_layer_cls = InternLM2DecoderLayer

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "bias", True)  # InternLM2Config's default
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @staticmethod
    def mlp_options(config) -> tuple[str, bool]:
        return getattr(config, "hidden_act", "silu"), False
