"""Hugging Face parity: octavo's greedy tokens and top-5 logprobs equal transformers' (fp32).

Each architecture is a tiny random-weight model saved by the test; transformers' `generate` on
each prompt alone is the reference, octavo runs all prompts as one batch.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_ARCHS
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
MAX_TOKENS = 20


def hf_reference(model_dir, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(l[0].float(), -1) for l in out.logits]
        results.append((tokens, logprobs))
    return results


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_greedy_and_logprobs_match_transformers(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    llm = LLM(model=model_dir, dtype="float32", kv_cache_memory=1 << 24, block_size=16)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5),
                           use_tqdm=False)
    reference = hf_reference(model_dir, [o.prompt_token_ids for o in outputs])
    for prompt, out, (hf_tokens, hf_logprobs) in zip(PROMPTS, outputs, reference):
        ours = out.outputs[0]
        assert ours.token_ids == hf_tokens, f"{arch}: greedy tokens differ for {prompt!r}"
        for step, (entry, ref) in enumerate(zip(ours.logprobs, hf_logprobs)):
            top_vals, top_ids = ref.topk(5)
            for value, token in zip(top_vals.tolist(), top_ids.tolist()):
                assert token in entry, f"{arch}: step {step} misses top-5 token {token}"
                assert entry[token].logprob == pytest.approx(value, abs=2e-4)
