"""Bench workloads: lengths, shared prefixes, special ids avoided, ShareGPT parsing."""
import json

import pytest
from transformers import AutoTokenizer

from octavo.bench.datasets import random_requests, sharegpt_requests


def test_random_lengths_in_range_and_no_special_ids():
    reqs = random_requests(50, 20, 10, 0, 1, 0.5, 100, {0, 1, 2}, seed=3)
    assert all(10 <= r.prompt_len <= 30 and 5 <= r.expected_output_len <= 15 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 1
    assert all(3 <= t < 100 for r in reqs for t in r.prompt_token_ids)
    assert reqs == random_requests(50, 20, 10, 0, 1, 0.5, 100, {0, 1, 2}, seed=3)


def test_prefix_repetition_shares_prefixes():
    reqs = random_requests(6, 4, 2, 8, 3, 0.0, 1000, set(), seed=0)
    prefixes = [tuple(r.prompt_token_ids[:8]) for r in reqs]
    assert len(set(prefixes)) == 3 and prefixes[0] == prefixes[3]
    assert len({tuple(r.prompt_token_ids[8:]) for r in reqs}) == 6


def test_sharegpt(llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    conv = lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    data = [conv("The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?"),
            conv("The capital of France is Paris.", ""),      # reply under 4 tokens: dropped
            {"conversations": [{"from": "human", "value": "no reply"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    (r,) = sharegpt_requests(str(path), 1, tok, None)
    assert r.prompt == data[0]["conversations"][0]["value"]
    assert r.expected_output_len == len(tok.encode("Hello there, how are you today?",
                                                   add_special_tokens=False))
    with pytest.raises(ValueError, match="fewer than"):
        sharegpt_requests(str(path), 2, tok, None)
