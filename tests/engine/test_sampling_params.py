"""SamplingParams: vLLM defaults, normalization and validation errors."""
import os
import sys

import pytest

from octavo.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer_util import make_llama_tokenizer, make_tokenizer  # noqa: E402


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.logit_bias is None and p.allowed_token_ids is None
    assert not p.is_greedy and p.sampling_type == "random"


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"),
    (dict(n=2, best_of=1), "best_of"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(frequency_penalty=2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["a", ""]), "stop"),
    (dict(stop="x", detokenize=False), "stop"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias"),
    (dict(temperature=0.0, n=2), "n must be 1"),
])
def test_invalid_field_raises_value_error_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0, top_p=1.0, min_p=1.0,
                   top_k=1, max_tokens=1, min_tokens=1, logprobs=0, prompt_logprobs=0,
                   repetition_penalty=0.01, temperature=0.0)
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None
    assert SamplingParams(n=3, best_of=5).best_of == 5


def test_normalization():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == [5, 3]
    assert SamplingParams(logprobs=True).logprobs == 1
    p = SamplingParams(logit_bias={"7": 150.0, 3: -200, 4: 0.5})
    assert p.logit_bias == {7: 100.0, 3: -100.0, 4: 0.5}
    # tiny positive temperatures are raised to 0.01 (vLLM) to avoid inf / nan
    assert SamplingParams(temperature=1e-3).temperature == pytest.approx(0.01)
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True) \
        .output_text_buffer_length == 0


def test_greedy_normalizes_truncation_knobs():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.2, seed=3)
    assert p.is_greedy and p.sampling_type == "greedy"
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=0.5, seed=1).sampling_type == "random_seed"
    assert SamplingParams(temperature=9e-6).is_greedy


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], logit_bias={1: 2.0}, allowed_token_ids=[1, 2])
    q = p.clone()
    q.stop.append("y")
    q.logit_bias[5] = 1.0
    q.allowed_token_ids.append(3)
    assert p.stop == ["x"] and p.logit_bias == {1: 2.0} and p.allowed_token_ids == [1, 2]
    assert q == SamplingParams(stop=["x", "y"], logit_bias={1: 2.0, 5: 1.0},
                               allowed_token_ids=[1, 2, 3])


@pytest.mark.parametrize("kwargs, field", [
    (dict(logit_bias={100: 1.0}), "logit_bias"),
    (dict(logit_bias={150: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[0, 100]), "allowed_token_ids"),
    (dict(stop_token_ids=[101]), "stop_token_ids"),
])
def test_verify_token_ids(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).verify_token_ids(100)
    SamplingParams(**kwargs).verify_token_ids(1000)


@pytest.mark.parametrize("make", [make_tokenizer, make_llama_tokenizer])
def test_bad_words_token_ids(make):
    tok = make()
    p = SamplingParams(bad_words=["capital", "Paris", " fox"])
    ids = p.bad_words_token_ids(tok)
    for word in ["capital", "Paris", "fox"]:
        plain = tok.encode(word, add_special_tokens=False)
        spaced = tok.encode(" " + word, add_special_tokens=False)
        assert plain in ids
        # the spaced variant is kept only when it is a different sequence of the same length
        assert (spaced in ids) == (spaced == plain or
                                   (spaced[0] != plain[0] and len(spaced) == len(plain)))
    assert all(0 <= t < len(tok) for seq in ids for t in seq)
    assert SamplingParams().bad_words_token_ids(tok) == []
