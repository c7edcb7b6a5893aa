"""Speculative decoding in the engine: greedy outputs equal plain decoding for each proposer
(batched, chunked prefill, preemption, prefix caching, stop strings, logprobs), the sampled
distribution is the target's (chi-square), and no block leaks after rollbacks."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from octavo import LLM, SamplingParams

from spec_util import assert_preemption_keeps_outputs

PROMPTS = [
    "a b c d a b c d a b c",                       # repetitive: n-gram drafts get accepted
    "hello world hello world hello world hello",
    "one two three four five six seven eight nine ten eleven twelve",
    "the cat the cat the",
]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


def make(model, **kw):
    kw.setdefault("enforce_eager", True)
    return LLM(model=model, **kw)


def ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def draft_dir(tiny_model_factory):
    # another random model with the target's tokenizer: it rarely agrees with the target
    return tiny_model_factory("LlamaForCausalLM", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def expected(llama_dir):
    return ids(make(llama_dir).generate(PROMPTS, GREEDY, use_tqdm=False))


def speculative_configs(llama_dir, draft_dir):
    return {"ngram": NGRAM,
            "self-draft": {"model": llama_dir, "num_speculative_tokens": 3},
            "other-draft": {"model": draft_dir, "num_speculative_tokens": 2}}


@pytest.mark.parametrize("method", ["ngram", "self-draft", "other-draft"])
def test_greedy_equals_plain_decoding(llama_dir, draft_dir, expected, method):
    spec = speculative_configs(llama_dir, draft_dir)[method]
    # a 12-token budget chunks the prompts and caps the drafts of a crowded step
    llm = make(llama_dir, speculative_config=spec, max_num_batched_tokens=12, block_size=4)
    assert ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    # again: prefix-cache hits now, and the drafts run over cached blocks
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert ids(again) == expected and any(o.num_cached_tokens > 0 for o in again)
    engine = llm.llm_engine
    stats = engine.spec.stats
    assert stats.num_draft_tokens > 0
    if method == "ngram":
        assert stats.num_accepted_tokens > 0            # the repetitive prompts pay off
    if method == "self-draft":                         # the target drafting for itself
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert engine.kv.pool.num_free == engine.kv.num_blocks     # rollbacks leaked nothing


@pytest.mark.parametrize("method", ["ngram", "other-draft"])
def test_preemption_keeps_outputs(llama_dir, draft_dir, method):
    assert_preemption_keeps_outputs(llama_dir, speculative_configs(llama_dir, draft_dir)[method],
                                    PROMPTS, GREEDY)


def test_logprobs_and_stop_strings_match_plain(llama_dir):
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)
    plain = make(llama_dir).generate(PROMPTS, params, use_tqdm=False)
    spec = make(llama_dir, speculative_config=NGRAM).generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-4 and pa[t].rank == pb[t].rank
        assert abs(a.outputs[0].cumulative_logprob - b.outputs[0].cumulative_logprob) < 1e-3
    # a stop string inside a step's accepted drafts ends the output where plain decoding does
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip(f"the tiny model's output {text!r} has no usable stop string")
    params = SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True)
    a = make(llama_dir).generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    b = make(llama_dir, speculative_config=NGRAM).generate(PROMPTS[0], params,
                                                          use_tqdm=False)[0].outputs[0]
    assert (a.text, list(a.token_ids), a.finish_reason) == (b.text, list(b.token_ids),
                                                            b.finish_reason)


def test_sampled_tokens_follow_the_target_distribution(llama_dir, draft_dir):
    """The second generated token of many seeded requests, given the most common first token,
    against the target's top-4 distribution from transformers (chi-square, significance
    0.001). A different random model drafts it, so most drafts are rejected and the token
    comes from the residual distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompt = "hello world"
    k, n = 4, 1200
    params = [SamplingParams(temperature=1.0, top_k=k, max_tokens=3, seed=i, ignore_eos=True)
              for i in range(n)]
    llm = make(llama_dir, max_num_seqs=256, enable_prefix_caching=True,
               speculative_config={"model": draft_dir, "num_speculative_tokens": 1})
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    stats = llm.llm_engine.spec.stats
    assert stats.num_drafts >= n // 2 and stats.num_accepted_tokens < stats.num_draft_tokens
    first = collections.Counter(o.outputs[0].token_ids[0] for o in outs)
    t1 = first.most_common(1)[0][0]
    second = collections.Counter(o.outputs[0].token_ids[1] for o in outs
                                 if o.outputs[0].token_ids[0] == t1)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        ids_ = tok(prompt, return_tensors="pt").input_ids
        logits = model(torch.cat([ids_, torch.tensor([[t1]])], dim=1)).logits[0, -1]
    top = torch.topk(logits, k)
    probs = torch.softmax(top.values, dim=-1).tolist()
    support = top.indices.tolist()
    total = sum(second.values())
    assert set(second) <= set(support)
    chi2 = sum((second.get(t, 0) - total * p) ** 2 / (total * p) for t, p in zip(support, probs))
    # chi-square with k - 1 = 3 degrees of freedom: P(X > 16.27) = 0.001
    assert total > 200 and chi2 < 16.27, (chi2, second, dict(zip(support, probs)))
    assert not math.isnan(chi2)


def test_bad_speculative_configs(llama_dir):
    for bad, words in [({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "eagle3", "num_speculative_tokens": 2}, "not supported yet"),
                       ({"method": "eagle", "num_speculative_tokens": 2}, "needs .model."),
                       ({"num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "oops": 1}, "oops"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ("{not json", "JSON")]:
        with pytest.raises(ValueError, match=words):
            make(llama_dir, speculative_config=bad)


def test_draft_with_another_vocabulary_is_refused(llama_dir, tiny_model_factory):
    other = tiny_model_factory("LlamaForCausalLM", vocab_size=600)
    with pytest.raises(ValueError, match="vocabulary"):
        make(llama_dir, speculative_config={"model": other, "num_speculative_tokens": 2})


def test_ngram_under_tensor_parallelism(llama_dir, expected):
    # the drafts travel to the worker processes with the step; rank 0's logits come back
    llm = make(llama_dir, speculative_config=NGRAM, tensor_parallel_size=2)
    try:
        assert ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        assert llm.llm_engine.spec.stats.num_accepted_tokens > 0
    finally:
        llm.llm_engine.executor.shutdown()


def test_layer_draft_is_the_targets_first_layers(llama_dir, tmp_path, expected):
    from safetensors.torch import load_file

    from octavo.bench.make_layer_draft import make_layer_draft
    draft = make_layer_draft(llama_dir, 1, str(tmp_path / "draft"))
    t = load_file(f"{llama_dir}/model.safetensors")
    d = load_file(f"{draft}/model.safetensors")
    assert sorted(d) == sorted(k for k in t if not k.startswith("model.layers.1."))
    assert all(torch.equal(d[k], t[k]) for k in d)
    llm = make(llama_dir, speculative_config={"model": draft, "num_speculative_tokens": 3})
    assert ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    with pytest.raises(ValueError, match="num-layers"):
        make_layer_draft(llama_dir, 3, str(tmp_path / "bad"))
