"""HF `architectures` name -> octavo model class (imported lazily)."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config):
    """The class for the first supported name in hf_config.architectures."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name in _MODELS:
            module, cls = _MODELS[name]
            return getattr(importlib.import_module(f"octavo.models.{module}"), cls)
    found = architectures or "no `architectures` entry in the config"
    raise ValueError(f"Model architectures {found} are not supported by octavo. "
                     f"Supported architectures: {', '.join(supported_architectures())}")
