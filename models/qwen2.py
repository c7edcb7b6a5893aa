"""Qwen2: the Llama decoder with q/k/v biases and an optional sliding window on the layers
that `layer_types` (or use_sliding_window + max_window_layers) mark as sliding."""
from __future__ import annotations

from octavo.models.llama import AttentionOptions, LlamaForCausalLM


def layer_sliding_window(config, layer_idx: int) -> int | None:
    # transformers' rule: layers i >= max_window_layers slide when use_sliding_window is set
    if not getattr(config, "use_sliding_window", False) or not getattr(config, "sliding_window", None):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    max_window_layers = getattr(config, "max_window_layers", config.num_hidden_layers)
    return config.sliding_window if layer_idx >= max_window_layers else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False,
                                sliding_window=layer_sliding_window(config, layer_idx))
