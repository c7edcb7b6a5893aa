"""IQuest-Coder-V1 (remote code, IQuestCoderForCausalLM): the Llama decoder plus two switches its
config borrows, OLMo's `clip_qkv` (q, k and v clamped to [-clip_qkv, clip_qkv] right after their
projections, before rotary) and Qwen2's sliding window (`use_sliding_window` with
`sliding_window`, on layers from `max_window_layers` on). Published checkpoints leave both off."""
from __future__ import annotations

import torch

from octavo.models.llama import AttentionOptions, LlamaAttention, LlamaForCausalLM


def sliding_window_of(config, layer_idx: int) -> int | None:
    """Qwen2's rule: the window applies from layer max_window_layers on."""
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", False) or window is None:
        return None
    return int(window) if layer_idx >= (getattr(config, "max_window_layers", 0) or 0) else None


class ClippedQKVAttention(LlamaAttention):
    """LlamaAttention whose fused q|k|v projection output is clamped to [-clip, clip] (a forward
    hook, so that the projection keeps its checkpoint names and tensor-parallel loaders)."""

    def __init__(self, config, opts: AttentionOptions, family=None):
        super().__init__(config, opts, family)
        self.clip = float(config.clip_qkv)
        if not self.clip > 0:
            raise ValueError(f"clip_qkv must be positive (got {config.clip_qkv}); set it to null "
                             "to turn clipping off")
        self.qkv_proj.register_forward_hook(self._clamp)

    def _clamp(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output.clamp(-self.clip, self.clip)  # [T, (Hq + 2 Hk) * hd]


class IQuestCoderForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config, layer_idx: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                sliding_window=sliding_window_of(config, layer_idx))

    @classmethod
    def make_attention(cls, config, opts: AttentionOptions):
        if getattr(config, "clip_qkv", None) is None:
            return LlamaAttention(config, opts, cls)
        return ClippedQKVAttention(config, opts, cls)
