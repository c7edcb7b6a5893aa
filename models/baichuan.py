"""Baichuan and Baichuan 2 (remote code): the Llama decoder with q|k|v fused in W_pack. The 7B
models use rotary positions; the 13B ones use ALiBi (slopes added in the attention kernel), told
apart by hidden_size as their configs carry no flag. Baichuan 2's NormHead uses the lm_head with
each row L2-normalised; its weights are normalised as they load."""
from __future__ import annotations

from octavo.models.layers.checkpoint_layouts import load_row_normalized
from octavo.models.layers.position import alibi_slopes_for_rank
from octavo.models.llama import AttentionOptions, LlamaForCausalLM

BAICHUAN2_VOCAB_SIZE = 125696
ROTARY_HIDDEN_SIZE = 4096   # Baichuan-7B and Baichuan2-7B; the 13B models (5120) use ALiBi


def uses_alibi(config) -> bool:
    return config.hidden_size != ROTARY_HIDDEN_SIZE


def is_baichuan2(config) -> bool:
    # Baichuan 2 configs add z_loss_weight and have a larger vocabulary than Baichuan 1
    return config.vocab_size == BAICHUAN2_VOCAB_SIZE or hasattr(config, "z_loss_weight")


class BaichuanForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping,
                              "W_pack": ("qkv_proj", None)}
    alibi = None  # None: decided per config by uses_alibi

    def __init__(self, config):
        if not hasattr(config, "max_position_embeddings"):  # the 13B configs name it so
            config.max_position_embeddings = getattr(config, "model_max_length", 4096)
        super().__init__(config)
        if self._uses_alibi(config):
            slopes = alibi_slopes_for_rank(config.num_attention_heads)
            for layer in self.model.stage_layers:
                layer.self_attn.attn.alibi_slopes = slopes
        if is_baichuan2(config) and not getattr(config, "tie_word_embeddings", False):
            load_row_normalized(self.lm_head)

    @classmethod
    def _uses_alibi(cls, config) -> bool:
        return uses_alibi(config) if cls.alibi is None else cls.alibi

    @classmethod
    def attention_options(cls, config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(rope=not cls._uses_alibi(config))


class BaiChuanForCausalLM(BaichuanForCausalLM):
    """Baichuan-7B: always rotary."""
    alibi = False
