"""SmolLM3: the Llama decoder where the layers that `no_rope_layers` marks 0 use no rotary (NoPE),
with Qwen2's optional per-layer sliding window."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM
from octavo.models.qwen2 import layer_sliding_window


class SmolLM3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                rope=bool(config.no_rope_layers[layer_idx]),
                                sliding_window=layer_sliding_window(config, layer_idx))
