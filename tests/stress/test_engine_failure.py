"""A failure inside an engine step (injected with OCTAVO_FAULT_INJECT).

The documented policy (octavo/async_engine.py): a failure pinned on one request fails that
request alone; a failing forward fails the requests of that step; the engine recovers and
/health stays 200. A fatal error (or three failing steps in a row) kills the engine: every
request gets a 503, /health answers 503, and the server process exits with status 1.
"""
from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from stress_faults import FATAL_FAULT, FORWARD_FAULT, SAMPLE_FAULT

from octavo import LLM, SamplingParams
from octavo.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from octavo.bench.stress import (check_error_shape, completion_body, greedy_alone, metrics,
                                 run_streams, wait_idle)


def test_sample_fault_fails_only_its_request(server):
    prompts = [f"Neighbour {i} of a bad request" for i in range(5)]
    ref = greedy_alone(server.url, prompts, 24)
    failed_steps = metrics(server.url)["octavo:engine_failed_steps_total"]
    bodies = [completion_body(p, 24) for p in prompts] + [
        completion_body(f"{SAMPLE_FAULT} breaks", 24)]
    results = run_streams(server.url, bodies, [None] * len(bodies))
    assert [r.text for r in results[:5]] == ref
    assert all(r.error is None for r in results[:5])
    assert results[5].error is not None and "injected sampling fault" in results[5].error
    assert "'code': 500" in results[5].error
    m = wait_idle(server.url)
    assert m["octavo:engine_failed_steps_total"] == failed_steps        # no step failed
    assert m["octavo:kv_cache_free_blocks"] == m["octavo:kv_cache_total_blocks"]
    assert m["octavo:request_success_total:error"] >= 1
    assert httpx.get(server.url + "/health").status_code == 200


def _http(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_forward_fault_fails_the_step_and_the_server_recovers(server):
    ref = greedy_alone(server.url, ["After the storm"], 8)
    failed_steps = metrics(server.url)["octavo:engine_failed_steps_total"]
    bad = completion_body(f"{FORWARD_FAULT} breaks the forward", 4)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        first = _http(sock, httpx.Request("POST", "/", json=bad).content)
        assert first.startswith(b"HTTP/1.1 500"), first[:200]
        assert b"connection: close" not in first.lower()
        body = first.split(b"\r\n\r\n", 1)[1]
        assert check_error_shape(500, httpx.Response(500, content=body).json()) is None
        assert b"injected forward fault" in body
        # the same keep-alive connection serves the next request
        again = _http(sock, httpx.Request("POST", "/", json=completion_body(
            "After the storm", 8)).content)
        assert again.startswith(b"HTTP/1.1 200"), again[:300]
    assert httpx.Response(200, content=again.split(b"\r\n\r\n", 1)[1]).json()[
        "choices"][0]["text"] == ref[0]
    m = wait_idle(server.url)
    assert m["octavo:engine_failed_steps_total"] == failed_steps + 1
    assert m["octavo:kv_cache_free_blocks"] == m["octavo:kv_cache_total_blocks"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_fatal_fault_kills_the_engine_and_the_process_exits_1(fatal_server):
    url = fatal_server.url
    ok = greedy_alone(url, ["Still alive"], 4)
    assert ok and httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/completions", json=completion_body(f"{FATAL_FAULT} now", 4),
                   timeout=30)
    assert r.status_code == 503 and check_error_shape(503, r.json()) is None, r.text
    assert "fatal" in r.json()["error"]["message"]
    health = httpx.get(url + "/health", timeout=10)      # within the grace period
    assert health.status_code == 503 and check_error_shape(503, health.json()) is None
    refused = httpx.post(url + "/v1/completions", json=completion_body("hi", 4), timeout=10)
    assert refused.status_code == 503
    assert fatal_server.wait(30) == 1, fatal_server.output()[-3000:]
    assert "the engine died" in fatal_server.output()


# ---- the policy in-process, on the AsyncLLMEngine ------------------------------------------
@pytest.fixture(scope="module")
def llm(chat_model_dir):
    return LLM(chat_model_dir, dtype="float32", kv_cache_memory=16 << 20)


def test_three_failing_steps_in_a_row_kill_the_engine(llm):
    engine = llm.llm_engine

    def broken_step():
        raise RuntimeError("broken runner")

    engine.step = broken_step
    deaths = []
    aengine = AsyncLLMEngine(engine, on_dead=deaths.append)
    params = SamplingParams(temperature=0, max_tokens=4)

    async def run():
        errors = []
        for i in range(3):
            try:
                async for _ in aengine.generate(f"r{i}", "Hello", params):
                    pass
            except RuntimeError as e:
                errors.append(e)
        with pytest.raises(EngineDeadError):
            await aengine.add_request("late", "Hello", params)
        return errors

    try:
        errors = asyncio.run(run())
    finally:
        aengine.shutdown()
        del engine.step
    assert [type(e) for e in errors] == [RequestFailedError, RequestFailedError,
                                         EngineDeadError]
    assert len(deaths) == 1 and "broken runner" in str(deaths[0])
    assert not aengine.is_running and aengine.num_failed_steps == 3
    assert engine.kv.pool.num_free == engine.kv.num_blocks
    engine.abort_request(list(engine.parents))


def test_offline_generate_raises_for_a_failing_request_and_the_engine_goes_on(llm,
                                                                             monkeypatch):
    """LLM.generate: the request that fails inside a step raises (StepError names it); the
    engine is left clean and serves the next call exactly."""
    from octavo.llm_engine import StepError

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = llm.generate(["A quiet day"], params)[0].outputs[0].token_ids
    monkeypatch.setenv("OCTAVO_FAULT_INJECT", "sample:@@offline-fault@@")
    with pytest.raises(StepError, match="injected sampling fault") as e:
        llm.generate(["A quiet day", "@@offline-fault@@ here"], params)
    assert list(e.value.failed) and not e.value.whole_step
    monkeypatch.delenv("OCTAVO_FAULT_INJECT")
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free == engine.kv.num_blocks
    assert llm.generate(["A quiet day"], params)[0].outputs[0].token_ids == ref


def test_logprobs_beyond_the_vocabulary_refused_at_admission(llm):
    """Checked against the model even when no max_logprobs cap applies."""
    engine = llm.llm_engine
    saved = getattr(engine.config, "max_logprobs", None)
    engine.config.max_logprobs = -1
    try:
        for field in ("logprobs", "prompt_logprobs"):
            with pytest.raises(ValueError, match="vocabulary size"):
                llm.generate(["Hi"], SamplingParams(max_tokens=2, **{field: engine.vocab_size + 1}))
        out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=2,
                                                  logprobs=engine.vocab_size))
    finally:
        engine.config.max_logprobs = saved
    assert len(out[0].outputs[0].logprobs[0]) >= engine.vocab_size
