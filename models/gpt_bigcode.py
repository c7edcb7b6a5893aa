"""GPTBigCode (SantaCoder, StarCoder 1): GPT-2 with nn.Linear weights and multi-query
attention (one shared k/v head); without multi_query, c_attn interleaves q/k/v per head."""
from __future__ import annotations

from octavo.models.gpt2 import GPT2Attention, GPT2Block, GPT2LMHeadModel, GPT2MLP


class GPTBigCodeAttention(GPT2Attention):
    conv1d = False

    @staticmethod
    def kv_layout(config) -> tuple[int, bool]:
        if getattr(config, "multi_query", True):
            return 1, False
        return config.num_attention_heads, True


class GPTBigCodeMLP(GPT2MLP):
    conv1d = False


class GPTBigCodeBlock(GPT2Block):
    attention_cls, mlp_cls = GPTBigCodeAttention, GPTBigCodeMLP


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    block_cls = GPTBigCodeBlock
