"""LLM.beam_search: greedy at width 1, never worse than greedy, the exact top sequences when
the width covers every prefix (checked against a brute-force search with transformers), a
plain-torch beam search at small width, and prompt KV blocks shared through the prefix cache."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import build_tiny_model, reference_beam_search
from octavo import LLM, SamplingParams
from octavo.beam_search import BeamSearchParams

PROMPT_IDS = [1, 5, 6, 3, 7, 4]
VOCAB = 8                      # tiny vocabulary so that every continuation can be enumerated


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("beam"))
    # A sharp random model (large init) so that the beams really differ.
    return build_tiny_model(path, "LlamaForCausalLM", seed=3, vocab_size=VOCAB,
                            initializer_range=0.5)


@pytest.fixture(scope="module")
def llm(small_vocab_dir):
    return LLM(small_vocab_dir, dtype="float32", kv_cache_memory=1 << 24)


@pytest.fixture(scope="module")
def hf_model(small_vocab_dir):
    return AutoModelForCausalLM.from_pretrained(small_vocab_dir, dtype=torch.float32).eval()


def sequence_logprobs(model, prompt, continuations):
    """Sum of log p(token | prefix) over each continuation, in one batched forward."""
    ids = torch.tensor([prompt + list(c) for c in continuations])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    n = len(prompt)
    steps = ids[:, n:]
    picked = logp[:, n - 1:-1].gather(2, steps.unsqueeze(-1)).squeeze(-1)
    return picked.sum(-1)


def test_width_one_is_greedy(llm):
    greedy = llm.generate({"prompt_token_ids": PROMPT_IDS},
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                         logprobs=1), use_tqdm=False)[0].outputs[0]
    out = llm.beam_search({"prompt_token_ids": PROMPT_IDS},
                          BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))
    (seq,) = out[0].sequences
    assert seq.tokens == PROMPT_IDS + greedy.token_ids
    assert seq.cum_logprob == pytest.approx(greedy.cumulative_logprob, abs=1e-5)
    assert seq.finish_reason == "length" and len(seq.logprobs) == 5


def test_best_beam_at_least_greedy(llm, hf_model):
    greedy = llm.generate({"prompt_token_ids": PROMPT_IDS},
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                         logprobs=0), use_tqdm=False)[0].outputs[0]
    out = llm.beam_search({"prompt_token_ids": PROMPT_IDS},
                          BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    seqs = out[0].sequences
    assert len(seqs) == 3
    assert seqs[0].cum_logprob >= greedy.cumulative_logprob - 1e-5
    # The reported scores are the model's: recompute them with transformers.
    ref = sequence_logprobs(hf_model, PROMPT_IDS, [s.output_token_ids for s in seqs])
    assert [s.cum_logprob for s in seqs] == pytest.approx(ref.tolist(), abs=1e-4)
    assert [s.cum_logprob for s in seqs] == sorted((s.cum_logprob for s in seqs), reverse=True)


def test_matches_exhaustive_search(llm, hf_model):
    length = 3
    width = VOCAB ** (length - 1)     # every prefix survives, so the search is exact
    out = llm.beam_search({"prompt_token_ids": PROMPT_IDS},
                          BeamSearchParams(beam_width=width, max_tokens=length, ignore_eos=True))
    every = list(itertools.product(range(VOCAB), repeat=length))
    scores = sequence_logprobs(hf_model, PROMPT_IDS, every)
    top = torch.topk(scores, width)
    got = out[0].sequences
    assert [tuple(s.output_token_ids) for s in got[:10]] == [every[i] for i in top.indices[:10]]
    assert {tuple(s.output_token_ids) for s in got} == {every[i] for i in top.indices.tolist()}
    assert [s.cum_logprob for s in got] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_matches_reference_beam_search_with_eos(llm, hf_model, length_penalty):
    ref = reference_beam_search(hf_model, PROMPT_IDS, 2, 6, eos=2, length_penalty=length_penalty)
    out = llm.beam_search({"prompt_token_ids": PROMPT_IDS},
                          BeamSearchParams(beam_width=2, max_tokens=6,
                                           length_penalty=length_penalty))[0].sequences
    assert [tuple(s.output_token_ids) for s in out] == [seq for seq, _ in ref]
    assert [s.cum_logprob for s in out] == pytest.approx([lp for _, lp in ref], abs=1e-4)
    for s in out:
        assert s.finish_reason == ("stop" if s.tokens[-1] == 2 else "length")


def test_beams_share_prompt_blocks(llm):
    """Every step's beam requests find the prompt's blocks in the prefix cache: the same
    physical blocks, for all beams, as the first step's request computed."""
    engine = llm.llm_engine
    prompt = list(range(1, 8)) * 6                     # 42 tokens: two full 16-token blocks
    seen: list[list[tuple[list[int], int]]] = []
    execute = engine.runner.execute

    def spy(out):
        seen.append([(list(s.request.block_ids), s.start) for s in out.scheduled])
        return execute(out)

    engine.runner.execute = spy
    hits_before = engine.kv.prefix_hits
    try:
        llm.beam_search({"prompt_token_ids": prompt},
                        BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    finally:
        engine.runner.execute = execute
    first_blocks = seen[0][0][0][:2]
    later = [entry for step in seen[1:] for entry in step]
    assert len(later) >= 3 * 3                         # 3 beams in each of steps 2..4
    for blocks, start in later:
        assert blocks[:2] == first_blocks              # shared, not copied
        assert start >= 32                             # the prompt's full blocks are not recomputed
    assert engine.kv.prefix_hits - hits_before >= len(later) * 32


def test_text_and_bad_input(chat_model_dir):
    llm = LLM(chat_model_dir, kv_cache_memory=1 << 24)
    out = llm.beam_search(["The capital of France is", "Hello"],
                          BeamSearchParams(beam_width=2, max_tokens=3))
    tok = llm.get_tokenizer()
    assert len(out) == 2
    for o, prompt in zip(out, ["The capital of France is", "Hello"]):
        assert o.sequences[0].tokens[:len(tok.encode(prompt))] == tok.encode(prompt)
        for s in o.sequences:
            gen = [t for t in s.output_token_ids if t != 2]
            assert s.text == tok.decode(gen, skip_special_tokens=True)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="prompt 1"):
        llm.beam_search(["ok", {"prompt_token_ids": [10 ** 6]}],
                        BeamSearchParams(beam_width=2, max_tokens=3))
