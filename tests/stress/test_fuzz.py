"""Malformed and hostile request bodies: a seeded fuzz over every endpoint, and one regression
case per bug a hostile-client trial found. Never a 5xx, always OpenAI's error shape, never a
hang, and the server answers normally afterwards."""
from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest

from octavo.bench.stress import (MODEL, check_error_shape, completion_body, fuzz_cases,
                                 greedy_alone, run_fuzz, run_streams, wait_idle)

VOCAB = 500           # the test tokenizer's
JSON = {"Content-Type": "application/json"}


def test_seeded_fuzz_every_endpoint(server):
    ref = greedy_alone(server.url, ["The capital of France is"], 8)
    cases = fuzz_cases(seed=1234, per_endpoint=150, vocab=VOCAB)
    report = run_fuzz(server.url, cases, timeout=30)
    print(f"fuzz: sent {report['sent']} {report['per_endpoint']}, statuses "
          f"{report['statuses']}, {report['seconds']:.1f}s")
    assert report["failures"] == []
    assert report["per_endpoint"]["/v1/completions"] == 150
    assert report["statuses"].get(400, 0) > 300            # most bodies are refused ...
    assert report["statuses"].get(200, 0) > 20             # ... some mutations are valid
    assert greedy_alone(server.url, ["The capital of France is"], 8) == ref
    m = wait_idle(server.url)
    assert m["octavo:kv_cache_free_blocks"] == m["octavo:kv_cache_total_blocks"]
    assert httpx.get(server.url + "/health").status_code == 200


def _raw(body: bytes, headers=JSON):
    return body, headers


# (what, path, body, headers, status, words the message must hold)
REGRESSIONS = [
    ("negative prompt token id", "/v1/completions",
     *_raw(json.dumps({"model": MODEL, "prompt": [5, -1]}).encode()), 400, "outside"),
    ("prompt token id of 64 bits", "/v1/completions",
     *_raw(json.dumps({"model": MODEL, "prompt": [2 ** 63 - 1]}).encode()), 400, "outside"),
    ("prompt token id beyond 64 bits", "/v1/completions",
     *_raw(json.dumps({"model": MODEL, "prompt": [2 ** 70]}).encode()), 400, "64-bit"),
    ("lone surrogate in a prompt", "/v1/completions",
     *_raw(b'{"model": "stress", "prompt": "a\\ud800b"}'), 400, "surrogate"),
    ("lone surrogate in content", "/v1/chat/completions",
     *_raw(b'{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400, "surrogate"),
    ("lone surrogate in a role", "/v1/chat/completions",
     *_raw(b'{"messages": [{"role": "\\ud83d", "content": "hi"}]}'), 400, "surrogate"),
    ("lone surrogate to /tokenize", "/tokenize",
     *_raw(b'{"prompt": "\\ud800"}'), 400, "surrogate"),
    ("invalid UTF-8", "/v1/completions",
     *_raw(b'{"model": "stress", "prompt": "\xff\xfe"}'), 400, "UTF-8"),
    ("5,000-digit integer", "/v1/completions",
     *_raw(b'{"prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}"), 400, "too large"),
    ("deep nesting", "/v1/chat/completions",
     *_raw(b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"), 400, "nested"),
    ("gzip body", "/v1/completions",
     gzip.compress(b'{"prompt": "hi"}'), {**JSON, "Content-Encoding": "gzip"}, 415,
     "Content-Encoding"),
    ("NaN", "/v1/completions", *_raw(b'{"prompt": "hi", "temperature": NaN}'), 400, "NaN"),
    ("infinity", "/v1/completions", *_raw(b'{"prompt": "hi", "top_p": 1e999}'), 400, "range"),
    ("huge n", "/v1/completions",
     *_raw(b'{"prompt": "hi", "n": 1000000000, "temperature": 1}'), 400, "max_num_seqs"),
    ("huge best_of", "/v1/completions",
     *_raw(b'{"prompt": "hi", "best_of": 100000, "temperature": 1}'), 400, "max_num_seqs"),
    ("seed that overflows with n", "/v1/completions",
     *_raw(b'{"prompt": "hi", "n": 2, "seed": 9223372036854775807, "temperature": 1}'), 400,
     "seed"),
    ("huge logprobs", "/v1/completions",
     *_raw(b'{"prompt": "hi", "logprobs": 1000000}'), 400, "logprobs"),
    ("huge prompt_logprobs", "/v1/completions",
     *_raw(b'{"prompt": "hi", "prompt_logprobs": 1000000}'), 400, "prompt_logprobs"),
    ("a request's own chat template (a program: it can loop for ever)", "/v1/chat/completions",
     *_raw(json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template":
                       "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}"
                       "{% endfor %}"}).encode()), 400, "--trust-request-chat-template"),
    ("wrong content type", "/v1/completions",
     b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("empty body", "/v1/completions", b"", JSON, 400, "body"),
    ("unknown route", "/v1/nothing", b"{}", JSON, 404, "Not Found"),
]


@pytest.mark.parametrize("what,path,body,headers,status,words", REGRESSIONS,
                         ids=[r[0] for r in REGRESSIONS])
def test_regression(server, what, path, body, headers, status, words):
    r = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert check_error_shape(status, r.json()) is None, r.text
    assert words in r.json()["error"]["message"], r.text


def test_bad_request_does_not_touch_streams_in_flight(server):
    """A request the engine cannot serve (logprobs beyond what it allows) is refused at
    admission; streams running at that moment end normally with their greedy text."""
    prompts = [f"Stream {i} goes on" for i in range(6)]
    ref = greedy_alone(server.url, prompts, 24)

    async def bad_requests_meanwhile():
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return [await client.post("/v1/completions", json=completion_body(
                "hi", 4, **{field: value})) for field, value in
                (("logprobs", VOCAB + 1), ("prompt_logprobs", 10 ** 6), ("logprobs", 2 ** 40))]

    async def both():
        loop = asyncio.get_running_loop()
        streams = loop.run_in_executor(None, run_streams, server.url,
                                       [completion_body(p, 24) for p in prompts],
                                       [None] * len(prompts))
        return await asyncio.gather(streams, bad_requests_meanwhile())

    results, bad = asyncio.run(both())
    assert [r.error for r in results] == [None] * 6
    assert [r.text for r in results] == ref
    for r in bad:
        assert r.status_code == 400 and check_error_shape(400, r.json()) is None, r.text
