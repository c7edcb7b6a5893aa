"""Random PEFT-format LoRA adapters for a model directory (no peft needed), for the benchmarks:
`octavo bench throughput --enable-lora --num-lora-adapters K` spreads the prompts over K."""
from __future__ import annotations

import json
import os

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each Llama-style projection."""
    h = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def write_random_adapter(model_dir: str, out_dir: str, rank: int, seed: int = 0) -> str:
    """An adapter of `rank` on every projection of every layer, small random A and B."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, (n_in, n_out) in _shapes(config).items():
            group = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": list(PROJECTIONS), "bias": "none",
                   "base_model_name_or_path": model_dir}, f)
    return out_dir


def random_lora_requests(model_dir: str, count: int, rank: int, root: str) -> list:
    """`count` LoRARequests of random adapters written under `root` (ids 1..count)."""
    from octavo.lora.request import LoRARequest

    return [LoRARequest(f"random-{i}", i + 1,
                        write_random_adapter(model_dir, os.path.join(root, f"lora{i}"), rank, i))
            for i in range(count)]
