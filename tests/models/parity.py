"""Hugging Face parity check shared by every architecture's test.

`assert_matches_hf(model_dir)` runs a batch of prompts through octavo (fp32, greedy, top-5
logprobs) and each prompt alone through transformers' `generate`; greedy token ids must be
identical and the top-5 logprobs close. `reference` (another model directory, or a transformers
model) is the equivalent transformers model when octavo loads a checkpoint transformers cannot
(remote-code layouts rebuilt from a transformers model).

The rest is what the tiny-model parity modules share: building their checkpoints
(`tiny_model_dirs`), their two standard tests (`parity_tests`), and the checks that a feature
bites (`assert_changes_logits` and friends) and that two tensor-parallel ranks give one rank's
logits (`assert_two_ranks_match_one`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from octavo import LLM, SamplingParams
from tiny_models import save_tiny_model

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


def assert_zeroing_changes_logits(model_dir: str, parts: list[tuple[str, str]], case: str) -> None:
    """Zeroing the tensors named like each (part, what it is) changes transformers' logits, so
    what they belong to is not a no-op octavo could skip."""
    ids = longest_prompt_ids()
    base = hf_logits(model_dir, ids)
    for part, what in parts:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            tensors = list(model.named_parameters()) + list(model.named_buffers())
            assert [p.zero_() for n, p in tensors if part in n], \
                f"{case}: no parameter named like {part!r}"
        assert_changes_logits(base, logits(model, ids), f"{case}: {what}")


def randomise_norms(tensors: dict, seed: int, biases: bool = False) -> None:
    """Add noise to the norm weights and, with `biases`, to every bias: transformers initialises
    them to 1 or 0, which would hide one loaded wrongly. A score-correction bias gets little: as
    large as the others it would pick the same experts for every token; small, it still changes
    some choices."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "norm" in name or (biases and name.endswith("bias")):
            scale = 0.03 if name.endswith("e_score_correction_bias") else 0.2
            tensors[name] = t + scale * torch.randn(t.shape, generator=gen)


def per_case(tmp_path_factory, build: Callable[[str, str], object]) -> Callable[[str], object]:
    """What a module-scoped fixture hands out: case -> build(case, a fresh temporary folder),
    built once per case."""
    return functools.cache(lambda case: build(case, str(tmp_path_factory.mktemp(case))))


def tiny_model_dirs(tmp_path_factory, cases: dict, common: dict, biases: bool = False,
                    bare: tuple[str, ...] = ()) -> Callable[[str], str]:
    """case -> directory of a tiny random transformers checkpoint, built once from
    cases[case] = (architecture, model_type, config fields) over `common` (the model types in
    `bare` name their fields differently and take none of it), norms (and with `biases` the
    biases) randomised."""
    def build(case: str, path: str) -> str:
        arch, model_type, fields = cases[case]
        save_tiny_model(path, model_type, arch, **{**({} if model_type in bare else common),
                                                   **fields})
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        randomise_norms(tensors, seed=1, biases=biases)
        save_file(tensors, file, metadata={"format": "pt"})
        return path

    return per_case(tmp_path_factory, build)


def parity_tests(cases: dict, features: dict[str, list[dict]]):
    """The two tests of a parity module with a `model_dirs` fixture (case -> checkpoint): octavo
    matches transformers on every case, and each config change in features[case] (one feature
    switched off) changes transformers' logits, so parity could not hold with octavo ignoring
    that feature. A module binds them to their names, which pytest collects:
    `test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output =
    parity_tests(CASES, FEATURES)`."""
    @pytest.mark.parametrize("case", list(cases))
    def test_greedy_and_logprobs_match_transformers(case, model_dirs):
        assert_matches_hf(model_dirs(case), block_size=16)

    @pytest.mark.parametrize("case, changes",
                             [(c, ch) for c, chs in features.items() for ch in chs],
                             ids=lambda v: v if isinstance(v, str) else "-".join(v))
    def test_feature_changes_transformers_output(case, changes, model_dirs):
        ids = longest_prompt_ids()
        assert_changes_logits(hf_logits(model_dirs(case), ids),
                              hf_logits(model_dirs(case), ids, **changes), f"{case}: {changes}")

    return test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output


# 13 and 21 tokens: a batched prefill of both longer than the sliding windows of 8, then a decode
TP_SEQS = [list(range(3, 16)), list(range(40, 61))]


def assert_refuses_tensor_parallelism(model_dir: str) -> None:
    """Building the model on one of two tensor-parallel ranks is a ValueError asking for
    tensor_parallel_size=1 (a norm across all heads, which the ranks would split)."""
    from octavo.models.layers.parallel_state import set_tensor_parallel
    from octavo.models.registry import get_model_class

    config = AutoConfig.from_pretrained(model_dir)
    set_tensor_parallel(0, 2)
    try:
        with pytest.raises(ValueError, match="tensor_parallel_size=1"):
            get_model_class(config)(config)
    finally:
        set_tensor_parallel(0, 1)


def assert_two_ranks_match_one(dirs: dict[str, str], workdir) -> None:
    """Each checkpoint (case -> directory) split over two tensor-parallel ranks gives one rank's
    logits of TP_SEQS."""
    from tp_util import one_rank_logits, two_rank_logits

    paths = list(dirs.values())
    for case, path, got in zip(dirs, paths, two_rank_logits(paths, TP_SEQS, str(workdir))):
        torch.testing.assert_close(got, one_rank_logits(path, TP_SEQS), atol=1e-4, rtol=0,
                                   msg=lambda m, case=case: f"{case}: {m}")
