"""Hugging Face parity check shared by every architecture's test.

`assert_matches_hf(model_dir)` runs a batch of prompts through octavo (fp32, greedy, top-5
logprobs) and each prompt alone through transformers' `generate`; greedy token ids must be
identical and the top-5 logprobs close. `reference` (another model directory, or a transformers
model) is the equivalent transformers model when octavo loads a checkpoint transformers cannot
(remote-code layouts rebuilt from a transformers model).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from octavo import LLM, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "A",
    "Once upon a time, there was a little robot who loved to read books and",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &. The quick brown fox "
    "jumps over the lazy dog, and the dog sleeps on.",
    "def main():\n    print('hello')\n",
    "She sells sea shells by the sea shore",
    "Large language models generate text one token at a time. In the beginning the engine was "
    "small, and the tokens were few; the capital of Italy is",
    "Hello world! Hello there, how are you today?",
]


def hf_greedy(model_dir, prompt_ids: list[list[int]], max_tokens: int, trust_remote_code=False):
    """[(tokens, [logprobs per step])] from transformers, one prompt at a time. `model_dir` may
    also be an already built transformers model."""
    model = model_dir if not isinstance(model_dir, str) else AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    results = []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(ids):].tolist()
        results.append((tokens, [torch.log_softmax(step[0].float(), -1) for step in out.logits]))
    return results


def assert_matches_hf(model_dir: str, prompts=PROMPTS, max_tokens: int = 20, atol: float = 2e-4,
                      reference=None, **llm_kwargs) -> None:
    llm_kwargs.setdefault("kv_cache_memory", 1 << 24)
    llm = LLM(model=model_dir, dtype="float32", **llm_kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5)
    outputs = llm.generate(list(prompts), params, use_tqdm=False)
    reference = hf_greedy(model_dir if reference is None else reference,
                          [o.prompt_token_ids for o in outputs], max_tokens,
                          llm_kwargs.get("trust_remote_code", False) and reference is None)
    name = model_dir.rstrip("/").split("/")[-1]
    for prompt, out, (hf_tokens, hf_logprobs) in zip(prompts, outputs, reference):
        ours = out.outputs[0]
        assert ours.token_ids == hf_tokens, f"{name}: greedy tokens differ for {prompt!r}"
        for step, (entry, ref) in enumerate(zip(ours.logprobs, hf_logprobs)):
            top_vals, top_ids = ref.topk(5)
            for value, token in zip(top_vals.tolist(), top_ids.tolist()):
                assert token in entry, f"{name}: step {step} misses top-5 token {token}"
                assert entry[token].logprob == pytest.approx(value, abs=atol)


def longest_prompt_ids() -> list[int]:
    from tokenizer_util import make_llama_tokenizer
    return make_llama_tokenizer()(PROMPTS[4]).input_ids


def logits(model, ids: list[int]) -> torch.Tensor:
    # a transformers model's logits of one prompt: [len(ids), vocab]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_logits(model_dir: str, ids: list[int], **changes) -> torch.Tensor:
    """transformers' logits for ids with `changes` set on the saved config first."""
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    return logits(AutoModelForCausalLM.from_pretrained(model_dir, config=config,
                                                       dtype=torch.float32), ids)


def assert_changes_logits(base: torch.Tensor, changed: torch.Tensor, what: str) -> None:
    """A feature switched off changes the reference logits, so parity could not pass with
    octavo ignoring it."""
    assert (base - changed).abs().max().item() > 1e-2, f"{what} makes no difference"
