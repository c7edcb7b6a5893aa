"""Save a random-weight Hugging Face model directory for benchmarks (config, weights, tokenizer).

python -m octavo.bench.make_random_model --out DIR --preset llama-100m [--dtype bfloat16]
The llama-100m preset: hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, tied
embeddings (about 110M parameters). qwen3-moe-1b: a Qwen3-MoE of 986M parameters, 194M active
per token (hidden 1024, 18 layers, 16 heads / 4 KV heads, 16 experts of intermediate 1024, top-2,
vocab 32000, tied embeddings). llama-medium: the peers' medium Llama (852.6M parameters: hidden
2048, 16 layers, 16 heads / 4 KV heads, intermediate 5632, vocab 32000, untied).
mamba-130m: state-spaces/mamba-130m's shape as MambaForCausalLM (129.1M parameters: hidden 768,
24 Mamba layers, state 16, conv 4, expand 2, dt rank 48, vocab 50280, tied embeddings).
Weights are drawn with a fixed seed, so the model is the same on every machine.
"""
from __future__ import annotations

import argparse

import torch

from octavo.bench.tokenizer_builder import build_llama_tokenizer

PRESETS = {
    "llama-100m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=768,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, initializer_range=0.02),
    "qwen3-moe-1b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                         hidden_size=1024, num_hidden_layers=18, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64, intermediate_size=3072,
                         moe_intermediate_size=1024, num_experts=16, num_experts_per_tok=2,
                         norm_topk_prob=True, vocab_size=32000, tie_word_embeddings=True,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.02),
    "llama-medium": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.02),
    "mamba-130m": dict(model_type="mamba", architectures=["MambaForCausalLM"], hidden_size=768,
                       num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2,
                       time_step_rank=48, use_bias=False, use_conv_bias=True, vocab_size=50280,
                       tie_word_embeddings=True, layer_norm_epsilon=1e-5, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, initializer_range=0.02),
    "llama-tiny": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=1000, tie_word_embeddings=True,
                       max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, initializer_range=0.02),
}


def make_random_model(out: str, preset: str = "llama-100m", dtype: str = "bfloat16",
                      seed: int = 0) -> int:
    """Write the model into `out`; returns its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.for_model(fields.pop("model_type"), dtype=dtype, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.save_pretrained(out)
    build_llama_tokenizer(config.vocab_size).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="llama-100m", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = make_random_model(args.out, args.preset, args.dtype, args.seed)
    print(f"saved {args.preset} ({n / 1e6:.1f}M parameters, {args.dtype}) to {args.out}")


if __name__ == "__main__":
    main()
