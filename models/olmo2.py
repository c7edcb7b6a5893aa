"""OLMo 2: the Llama decoder with RMSNorm after attention and after the MLP (no pre-norms) and
RMSNorm on the whole q and k projections (across heads) before rotary."""
from __future__ import annotations

from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.llama import AttentionOptions, LlamaForCausalLM, NormNames


class Olmo2ForCausalLM(LlamaForCausalLM):
    norm_names = NormNames(None, "post_attention_layernorm", None, "post_feedforward_layernorm")

    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)

    @staticmethod
    def make_qk_norm(config, num_heads: int, head_dim: int) -> RMSNorm:
        if get_tp_size() > 1:  # the norm spans all heads, which tensor parallelism splits
            raise ValueError("Olmo2ForCausalLM does not support tensor parallelism yet "
                             "(its q/k norm spans all heads); use tensor_parallel_size=1")
        return RMSNorm(num_heads * head_dim, eps=config.rms_norm_eps)
