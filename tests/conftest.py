"""Shared fixtures: tiny random-weight Hugging Face models saved to disk, built offline."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tokenizer_util import make_llama_tokenizer  # noqa: E402

# Architectures of the foundation and the config fields that make each one itself. Sliding
# windows are shorter than the test prompts so that the window is exercised.
TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                   initializer_range=0.08, rms_norm_eps=1e-5)
TINY_ARCHS = {
    "LlamaForCausalLM": dict(model_type="llama"),
    "MistralForCausalLM": dict(model_type="mistral", sliding_window=12),
    "Qwen2ForCausalLM": dict(model_type="qwen2", use_sliding_window=True, sliding_window=10,
                             max_window_layers=1, tie_word_embeddings=True),
    "Qwen3ForCausalLM": dict(model_type="qwen3", head_dim=32, num_key_value_heads=1),
}


def build_tiny_model(path: str, arch: str, seed: int = 0, **overrides) -> str:
    """Save a random-weight `arch` model in fp32 and the test tokenizer into `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_llama_tokenizer()
    fields = {**TINY_COMMON, **TINY_ARCHS[arch], **overrides}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), architectures=[arch], **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def make(arch: str = "LlamaForCausalLM", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = str(tmp_path_factory.mktemp(arch))
            cache[key] = build_tiny_model(path, arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM")
