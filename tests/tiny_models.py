"""Tiny random-weight Hugging Face models saved to disk, built offline: the builders the
tests import (`from tiny_models import ...`; conftest.py turns them into fixtures)."""
from __future__ import annotations

import torch

from tokenizer_util import make_llama_tokenizer

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


# State-space models (Mamba family): small states and, for Mamba-2, a chunk shorter than the
# test prompts so that transformers' chunked SSD runs over several chunks.
TINY_SSM_COMMON = dict(hidden_size=64, num_hidden_layers=2, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, initializer_range=0.08, layer_norm_epsilon=1e-5)
TINY_SSM_ARCHS = {
    "MambaForCausalLM": dict(model_type="mamba", state_size=8, conv_kernel=4, expand=2,
                             tie_word_embeddings=False),
    "FalconMambaForCausalLM": dict(model_type="falcon_mamba", state_size=8, conv_kernel=4,
                                   expand=2, mixer_rms_eps=1e-6, tie_word_embeddings=False),
    "Mamba2ForCausalLM": dict(model_type="mamba2", state_size=16, conv_kernel=4, expand=2,
                              num_heads=8, head_dim=16, n_groups=2, chunk_size=8),
    # layers: mamba + MoE, attention + MLP, mamba + MoE, attention + MLP
    "JambaForCausalLM": dict(model_type="jamba", num_hidden_layers=4, attn_layer_period=2,
                             attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                             num_experts=4, num_experts_per_tok=2, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8,
                             mamba_d_conv=4, mamba_expand=2, rms_norm_eps=1e-6,
                             max_position_embeddings=512, tie_word_embeddings=False),
    # layers: mamba-2, attention (rotary on half of each head), mamba-2
    "BambaForCausalLM": dict(model_type="bamba", num_hidden_layers=3, attn_layer_indices=[1],
                             intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                             rms_norm_eps=1e-6, max_position_embeddings=512,
                             tie_word_embeddings=False),
    # layers: mamba-2, attention with rope, mamba-2; MoE + shared MLP on each; muP multipliers
    "GraniteMoeHybridForCausalLM": dict(
        model_type="granitemoehybrid", num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], position_embedding_type="rope",
        intermediate_size=48, shared_intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8,
        mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=8, rms_norm_eps=1e-6, max_position_embeddings=512,
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=2.0, tie_word_embeddings=False),
}


def build_tiny_ssm_model(path: str, arch: str, seed: int = 0, **overrides) -> str:
    """Save one of TINY_SSM_ARCHS into `path`."""
    fields = {**TINY_SSM_COMMON, **TINY_SSM_ARCHS[arch], **overrides}
    return save_tiny_model(path, fields.pop("model_type"), arch, seed, **fields)


def reference_beam_search(model, prompt, width, steps, eos=None, length_penalty=1.0):
    """Plain-torch beam search with vLLM's rules: 2*width candidates per beam (at most the
    vocabulary), an EOS candidate completes its beam, score = cum_logprob /
    len(prompt + tokens without a final EOS) ** length_penalty. The best `width` of the finished
    and running beams, as (tokens, cum_logprob); eos=None: no EOS (ignore_eos)."""
    def score(seq, lp):
        n = len(prompt) + len(seq) - (1 if seq and seq[-1] == eos else 0)
        return lp / n ** length_penalty

    beams, done = [((), 0.0)], []
    for _ in range(steps):
        cands = []
        for seq, lp in beams:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            vals, ids = logp.topk(min(2 * width, logp.numel()))
            for v, t in zip(vals.tolist(), ids.tolist()):
                (done if t == eos else cands).append((seq + (t,), lp + v))
        beams = sorted(cands, key=lambda b: score(*b), reverse=True)[:width]
    return sorted(done + beams, key=lambda b: score(*b), reverse=True)[:width]
