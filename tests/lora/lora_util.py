"""Builders for the LoRA tests: PEFT adapters with random (nonzero) A and B saved to disk, and
the transformers + PEFT reference outputs they must match."""
from __future__ import annotations

import torch

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base_dir: str, path: str, seed: int, r: int = 8, alpha: float = 16,
                 targets=tuple(ALL_PROJ), use_rslora: bool = False, scale: float = 1.0,
                 **config) -> str:
    """A PEFT LoRA adapter of the model in base_dir with random A and B (PEFT's
    init_lora_weights=False; B is zero by default, which would test nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     init_lora_weights=False, lora_dropout=0.0, **config)
    model = get_peft_model(base, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(scale)
    model.save_pretrained(path)
    return path


def peft_model(base_dir: str, adapter_dir: str | None):
    """transformers model in fp32 with the adapter applied (None: the base model)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base
    from peft import PeftModel
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def hf_greedy_one(model, ids: list[int], max_tokens: int):
    """(tokens, [log-softmax per step]) of greedy decoding with transformers (+ PEFT)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(step[0].float(), -1) for step in out.logits]
