"""Reliability workloads against a real `octavo serve` process: concurrent streams with clients
that leave, a seeded fuzz of malformed bodies, KV-cache exhaustion, and injected engine faults.

tests/stress runs them small; `octavo bench stress --long` (or `python -m octavo.bench.stress
--long`) runs them large and prints the figures. Every loop is bounded in count and time, and
servers listen on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import re
import reprlib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# A ChatML-like template, so that chat works on any model (random ones have none).
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MODEL = "stress"
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, there was",
           "The quick brown fox jumps over", "In a galaxy far away", "My favourite food is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`octavo serve MODEL` in a subprocess on a free loopback port; stop() kills it."""

    def __init__(self, model: str, args: list[str] = (), env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="octavo-stress-", suffix=".log",
                                               delete=False)
        cmd = [sys.executable, "-m", "octavo.entrypoints.cli", "serve", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", MODEL,
               "--chat-template", CHAT_TEMPLATE, "--uvicorn-log-level", "warning", *args]
        full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=full_env)
        self.startup_timeout = startup_timeout
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "ServerProcess":
        """Block until /health answers 200 (raises if the server exits or is late)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in {self.startup_timeout}s:\n"
                           f"{self.output()}")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            if self.wait(15) is None:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


# ---- /metrics -------------------------------------------------------------------------------
def metrics(url: str) -> dict[str, float]:
    """Series name (labels dropped except finished_reason) -> value."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{")[0]
        if 'finished_reason="' in series:
            name += ":" + series.split('finished_reason="')[1].split('"')[0]
        out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free; returns the
    last reading (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (m["octavo:num_requests_running"] == 0 and m["octavo:num_requests_waiting"] == 0
                and m["octavo:kv_cache_free_blocks"] == m["octavo:kv_cache_total_blocks"])
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# ---- requests -------------------------------------------------------------------------------
def completion_body(prompt: Any, max_tokens: int, **kw: Any) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **kw}


def greedy_alone(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy completion, asked for alone (the reference for concurrent runs)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        texts = []
        for p in prompts:
            r = client.post("/v1/completions", json=completion_body(p, max_tokens))
            r.raise_for_status()
            texts.append(r.json()["choices"][0]["text"])
        return texts


@dataclass
class StreamResult:
    text: str = ""
    chunks: int = 0
    aborted: bool = False            # the client left on purpose
    finish_reason: str | None = None
    error: str | None = None         # a transport error, an HTTP status or an in-band error


async def _one_stream(client: httpx.AsyncClient, body: dict, leave_after: int | None
                      ) -> StreamResult:
    res = StreamResult()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"in-band: {event['error']}"
                    continue
                for c in event.get("choices", []):
                    res.text += c["text"]
                    res.finish_reason = c.get("finish_reason") or res.finish_reason
                res.chunks += 1
                if leave_after is not None and res.chunks >= leave_after:
                    res.aborted = True           # leaving the block closes the connection
                    return res
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def run_streams(url: str, bodies: list[dict], leave_after: list[int | None],
                timeout: float = 60.0) -> list[StreamResult]:
    """All bodies as concurrent streaming completions; client i closes its connection after
    leave_after[i] chunks (None: reads to the end). Bounded by `timeout` in all."""
    async def main() -> list[StreamResult]:
        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            tasks = [_one_stream(client, {**b, "stream": True}, k)
                     for b, k in zip(bodies, leave_after)]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    return asyncio.run(main())


def stream_workload(url: str, num_streams: int, max_tokens: int, leave_every: int | None = 3,
                    num_prompts: int | None = None, seed: int = 0) -> dict:
    """`num_streams` concurrent greedy streams over `num_prompts` distinct prompts (default:
    all distinct), every `leave_every`-th client leaving after a few chunks (None: none
    leaves). Returns the figures and every mismatch against the prompts run alone."""
    rng = random.Random(seed)
    num_prompts = num_prompts or num_streams
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {seed}.{i % num_prompts}"
               for i in range(num_streams)]
    unique = sorted(set(prompts))
    ref = dict(zip(unique, greedy_alone(url, unique, max_tokens)))
    # leave after 1 to max_tokens/4 chunks: well before the end, as a chunk can hold several
    # tokens (text held back until it is whole)
    leave = [rng.randint(1, max(1, max_tokens // 4))
             if leave_every is not None and i % leave_every == 0 else None
             for i in range(num_streams)]
    t0 = time.monotonic()
    results = run_streams(url, [completion_body(p, max_tokens) for p in prompts], leave)
    seconds = time.monotonic() - t0
    problems = []
    for p, r in zip(prompts, results):
        if r.error is not None:
            problems.append(f"{p!r}: {r.error}")
        elif not r.aborted and (r.text != ref[p] or r.finish_reason != "length"):
            problems.append(f"{p!r}: streamed {r.text!r} ({r.finish_reason}), alone {ref[p]!r}")
        elif r.aborted and not ref[p].startswith(r.text):
            problems.append(f"{p!r}: the part streamed before leaving {r.text!r} is not a "
                            f"prefix of {ref[p]!r}")
    return {"streams": num_streams, "leaving": sum(k is not None for k in leave),
            "aborted": sum(r.aborted for r in results),
            "completed": sum(not r.aborted and r.error is None for r in results),
            "seconds": seconds, "problems": problems}


# ---- fuzz -----------------------------------------------------------------------------------
@dataclass
class Case:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    what: str = ""


# Placeholders replaced in the serialized JSON by text json.dumps cannot write.
_RAW = {"@@NAN@@": b"NaN", "@@INF@@": b"Infinity", "@@NINF@@": b"-Infinity",
        "@@BIGEXP@@": b"1e999", "@@HUGEINT@@": b"9" * 5000, "@@BADUTF8@@": b'"\xff\xfe\xc3("',
        "@@LONE@@": b'"\\ud800x"', "@@LOWLONE@@": b'"a\\udfffb"'}

BASES = {
    "/v1/completions": {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 4, "temperature": 0},
    "/tokenize": {"model": MODEL, "prompt": "Hello"},
    "/detokenize": {"model": MODEL, "tokens": [5, 6, 7]},
}
SAMPLING_FIELDS = ["n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                   "stream", "stream_options", "logit_bias", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "max_tokens",
                   "ignore_eos", "stop_token_ids", "allowed_token_ids", "bad_words",
                   "prompt_logprobs", "include_stop_str_in_output", "skip_special_tokens",
                   "user", "model"]
FIELDS = {
    "/v1/completions": ["prompt", "logprobs", "echo", "suffix", "add_special_tokens",
                        *SAMPLING_FIELDS],
    "/v1/chat/completions": ["messages", "logprobs", "top_logprobs", "max_completion_tokens",
                             "tools", "tool_choice", "response_format", "chat_template_kwargs",
                             "add_generation_prompt", "continue_final_message",
                             "add_special_tokens", "chat_template", *SAMPLING_FIELDS],
    "/tokenize": ["prompt", "messages", "add_special_tokens", "add_generation_prompt",
                  "return_token_strs", "chat_template_kwargs", "chat_template", "model"],
    "/detokenize": ["tokens", "model"],
}


def _nasty_values(rng: random.Random, vocab: int) -> list[Any]:
    """Values wrong for almost any field."""
    return [None, True, False, 0, -1, 1, 2, 7, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
            -(2 ** 63) - 1, 10 ** 30, vocab, vocab + 1, 10 ** 6, 1e308, -1e308, 1e-320, 0.5,
            -0.0, 3.7, "", "x", "x" * rng.choice([1000, 100_000]), "\x00", "\u2028", "🙂" * 50,
            "@@NAN@@", "@@INF@@", "@@NINF@@", "@@BIGEXP@@", "@@HUGEINT@@", "@@BADUTF8@@",
            "@@LONE@@", "@@LOWLONE@@", [], {}, [[]], [None], [-1], [2 ** 63], [vocab],
            [1, "a"], [[1, 2], [-5]], [1.5], {"a": 1}, {"-1": 5}, {"0": "@@NAN@@"},
            {"0": 1e308}, {"abc": 1}, [""] * 3, ["stop"] * 1000, list(range(3000)),
            {"type": "json_object"}, {"include_usage": "yes"}, {"include_usage": True},
            [{"type": "function", "function": {"name": "f"}}], "auto", "required",
            f"@@DEEP:{rng.choice([40, 70, 3000])}:{rng.choice('LD')}@@"]


def _typed_values(name: str, vocab: int) -> list[Any]:
    """Values of (nearly) the field's own type that are wrong or extreme for it: the ones that
    reach deepest, past the schema into the engine."""
    ints = [-1, 0, 1, 2, 3, 20, 21, vocab - 1, vocab, vocab + 1, 10 ** 6, 10 ** 9, 2 ** 31,
            2 ** 62, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, 2 ** 64 - 1, 2 ** 64, "@@HUGEINT@@",
            1.5, "5", True]
    floats = ["@@NAN@@", "@@INF@@", "@@NINF@@", "@@BIGEXP@@", -0.0, 0.0, 1e-320, 1e-30,
              1e-6, 0.01, 0.999, 1.0, 1.0000001, 2.0, 2.5, -1.0, 1e30, 1e308, -1e308, "0.5"]
    strings = ["@@LONE@@", "@@LOWLONE@@", "@@BADUTF8@@", "", "\x00", "\ufeff", "\u2028",
               "x" * 100_000, "🙂" * 1000, "</s>", "<s>" * 100, "{{ 7 * 7 }}", "\\u0000", 5]
    ids = [[-1], [0], [vocab - 1], [vocab], [2 ** 31], [2 ** 63 - 1], [-(2 ** 63)], [2 ** 64],
           [], [[]], [[1], []], [[1, 2], [-5]], [1.5], ["1"], [None], list(range(3000)),
           [1] * 200, ["@@LONE@@"], "@@LONE@@"]
    dicts = [{"-1": 1}, {str(vocab): 1}, {str(2 ** 63): 1}, {"5": "@@NAN@@"}, {"5": 1e308},
             {"5": "@@INF@@"}, {"x": 1}, {"5": "a"}, {"return_dict": True}, {"messages": 1},
             {"tokenize": True}, {"@@LONE@@": 1}, {"include_usage": 5},
             {"type": "json_schema"}, {"tools": 1}, {"add_generation_prompt": "x"},
             f"@@DEEP:{70}:D@@"]
    kinds = {
        "n": ints, "best_of": ints, "top_k": ints, "seed": ints, "max_tokens": ints,
        "min_tokens": ints, "logprobs": ints + [True, False], "top_logprobs": ints,
        "prompt_logprobs": ints, "max_completion_tokens": ints,
        "temperature": floats, "top_p": floats, "min_p": floats, "presence_penalty": floats,
        "frequency_penalty": floats, "repetition_penalty": floats,
        "prompt": strings + ids, "tokens": ids, "stop_token_ids": ids,
        "allowed_token_ids": ids, "stop": strings + [["@@LONE@@"], [""], ["x"] * 10_000],
        "bad_words": [["@@LONE@@"], [""], [" "], ["</s>"], ["x" * 10_000], ["🙂"] * 100],
        "user": strings, "model": strings, "suffix": strings,
        "logit_bias": dicts, "stream_options": dicts, "response_format": dicts,
        "chat_template_kwargs": dicts,
        "tools": [[{"type": "function", "function": {"name": "@@LONE@@"}}], [1], [[]]],
        "tool_choice": ["required", {"type": "function"}, "@@LONE@@", 5],
        "chat_template": ["{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}"
                          "{% endfor %}", "{% for x in y %}", "{{ raise_exception('no') }}",
                          "{{ messages[0]['content'] * 100000000 }}", "", 5],
    }
    return kinds.get(name, [True, False, None, "yes", 1, "@@LONE@@"])


def _deep(match: re.Match) -> bytes:
    depth, kind = int(match.group(1)), match.group(2)
    if kind == b"L":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _messages(rng: random.Random) -> Any:
    roles = ["user", "assistant", "system", "tool", "developer", "wizard", "", 5, None,
             "@@LONE@@", "USER", "user" * 1000]
    contents = ["Hi", "", None, 5, [], [{"type": "text", "text": "Hi"}],
                [{"type": "image_url", "image_url": {"url": "http://x"}}], [{"type": "text"}],
                [{"type": "text", "text": 5}], ["raw"], [[["deep"]]], {"text": "Hi"},
                "@@LONE@@", "@@BADUTF8@@", "{{ 7 * 7 }}", "{% for x in range(10) %}",
                "x" * 20_000]
    k = rng.choice([0, 1, 1, 2, 3, 200])
    msgs = []
    for _ in range(k):
        m: dict[str, Any] = {}
        if rng.random() < 0.9:
            m["role"] = rng.choice(roles)
        if rng.random() < 0.9:
            m["content"] = rng.choice(contents)
        if rng.random() < 0.1:
            m["name"] = rng.choice(["bob", 5, "@@LONE@@"])
        msgs.append(m)
    return rng.choice([msgs, msgs, "Hi", None, [["user", "Hi"]], {"role": "user"}])


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 40, 40, 4, 4


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _encode(body: Any) -> bytes:
    raw = json.dumps(body).encode()          # ASCII: \\u escapes keep lone surrogates writable
    for k, v in _RAW.items():
        raw = raw.replace(f'"{k}"'.encode(), v)
    return re.sub(rb'"@@DEEP:(\d+):([LD])@@"', _deep, raw)


def _mutate(rng: random.Random, path: str, vocab: int) -> tuple[Any, str]:
    body = json.loads(json.dumps(BASES[path]))
    what = []
    for _ in range(rng.choice([1, 1, 1, 1, 2, 3])):
        name = rng.choice(FIELDS[path])
        r = rng.random()
        if name == "messages" and r < 0.7:
            body[name] = _messages(rng)
        elif r < 0.1:
            body.pop(name, None)
            what.append(f"drop {name}")
            continue
        elif r < 0.7:
            body[name] = rng.choice(_typed_values(name, vocab))
        else:
            body[name] = rng.choice(_nasty_values(rng, vocab))
        what.append(f"{name}={_short(body[name])}")
    if rng.random() < 0.05:
        body = rng.choice([None, [], 5, "str", [body], f"@@DEEP:5000:{rng.choice('LD')}@@"])
        what = ["top-level " + _short(body)]
    return body, ", ".join(what)


def _byte_cases(rng: random.Random, path: str) -> list[Case]:
    """Cases wrong below JSON: encodings, media types, truncation, deep nesting."""
    base = json.dumps(BASES[path]).encode()
    json_h = {"Content-Type": "application/json"}
    flip = bytearray(base)
    for _ in range(3):
        flip[rng.randrange(len(flip))] = rng.randrange(256)
    return [
        Case("POST", path, b"", json_h, "empty body"),
        Case("POST", path, b"", {}, "empty body, no content type"),
        Case("POST", path, gzip.compress(base), {**json_h, "Content-Encoding": "gzip"},
             "gzip body"),
        Case("POST", path, gzip.compress(base), json_h, "gzip body, no Content-Encoding"),
        Case("POST", path, base, {**json_h, "Content-Encoding": "br"}, "brotli header"),
        Case("POST", path, base, {"Content-Type": "text/plain"}, "text/plain"),
        Case("POST", path, base, {"Content-Type": "application/x-www-form-urlencoded"},
             "form content type"),
        Case("POST", path, base, {"Content-Type": "application/json; charset=latin-1"},
             "charset parameter"),
        Case("POST", path, base[:rng.randrange(1, len(base))], json_h, "truncated"),
        Case("POST", path, bytes(flip), json_h, "flipped bytes"),
        Case("POST", path, b"\xef\xbb\xbf" + base, json_h, "UTF-8 BOM"),
        Case("POST", path, base.replace(b"{", b"{\xff", 1), json_h, "invalid UTF-8"),
        Case("POST", path, b"[" * 100_000 + b"]" * 100_000, json_h, "deep list"),
        Case("POST", path, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, json_h, "deep object"),
        Case("POST", path, b'{"n": ' + b"9" * 5000 + b"}", json_h, "5000-digit int"),
        Case("POST", path, b'{"model": "x", "model": "y"}', json_h, "duplicate keys"),
        Case("POST", path, b"\x00" * 64, json_h, "NUL bytes"),
        Case("GET", path, None, {}, "GET on a POST endpoint"),
        Case("PUT", path, base, json_h, "PUT"),
    ]


def fuzz_cases(seed: int, per_endpoint: int, vocab: int) -> list[Case]:
    """`per_endpoint` seeded cases for each POST endpoint (byte-level ones first), plus a few
    for the GET endpoints."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for path in BASES:
        mine = _byte_cases(rng, path)
        while len(mine) < per_endpoint:
            body, what = _mutate(rng, path, vocab)
            mine.append(Case("POST", path, _encode(body), {"Content-Type": "application/json"},
                             what))
        cases += mine[:per_endpoint]
    for path in ("/v1/models", "/health", "/metrics", "/v1/nope", "/"):
        cases += [Case("GET", path, None, {}, "plain GET"),
                  Case("POST", path, b"{}", {"Content-Type": "application/json"}, "POST"),
                  Case("GET", path + "?x=%ff%fe&" + "a=1&" * 500, None, {}, "odd query")]
    return cases


def check_error_shape(status: int, payload: Any) -> str | None:
    """None if `payload` is OpenAI's error object for `status`, else what is wrong."""
    if not isinstance(payload, dict) or set(payload) != {"error"}:
        return f"not {{'error': ...}}: {str(payload)[:200]}"
    err = payload["error"]
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"error keys are {sorted(err) if isinstance(err, dict) else err!r}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(
            err["type"], str) or err["code"] != status or not (
            err["param"] is None or isinstance(err["param"], str)):
        return f"bad error fields: {err}"
    return None


def _judge(case: Case, r: httpx.Response) -> str | None:
    if r.status_code >= 500:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    if r.status_code == 200 and case.path.split("?")[0] in ("/metrics", "/health"):
        return None
    ctype = r.headers.get("content-type", "")
    if "text/event-stream" in ctype:
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    status = event["error"].get("code") if isinstance(event["error"], dict) \
                        else None
                    bad = check_error_shape(status, event)
                    if bad or status >= 500:
                        return f"in-band error {event}"
        return None
    try:
        payload = r.json()
    except ValueError:
        return f"HTTP {r.status_code}, not JSON: {r.text[:200]!r}"
    if r.status_code >= 400:
        return check_error_shape(r.status_code, payload)
    return None


def run_fuzz(url: str, cases: list[Case], timeout: float = 30.0, max_timeouts: int = 3
             ) -> dict:
    """Send every case (one keep-alive connection, as clients do); collect each answer that is
    a 5xx, not OpenAI's error shape, or late. After `max_timeouts` late answers the server is
    taken for hung and the rest is not sent. Returns the figures and the failures."""
    failures, per_endpoint, statuses = [], {}, {}
    timeouts = 0
    t0 = time.monotonic()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for case in cases:
            if timeouts >= max_timeouts:
                failures.append(f"stopped after {timeouts} timeouts: the server hangs")
                break
            endpoint = case.path.split("?")[0]
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + 1
            try:
                r = client.request(case.method, case.path, content=case.body,
                                   headers=case.headers)
            except httpx.HTTPError as e:
                timeouts += isinstance(e, httpx.TimeoutException)
                failures.append(f"{case.method} {case.path} [{case.what}]: "
                                f"{type(e).__name__}: {e}")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            bad = _judge(case, r)
            if bad:
                failures.append(f"{case.method} {case.path} [{case.what}]: {bad}")
    return {"sent": len(cases), "per_endpoint": per_endpoint, "statuses": statuses,
            "failures": failures, "seconds": time.monotonic() - t0}


# ---- the suite as a command ---------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory (default: a random llama-tiny built in a temp dir)")
    p.add_argument("--long", action="store_true", help="the long mode: more of everything")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streams", type=int, default=None, help="concurrent streams (64; long 256)")
    p.add_argument("--fuzz-per-endpoint", type=int, default=None,
                   help="fuzz bodies per POST endpoint (200; long 2000)")
    p.add_argument("--small-kv-cache", default="192KiB",
                   help="the server's KV budget, far too small for the load on purpose (the "
                        "default holds the random model's max_model_len 256 about 1.5 times)")
    p.add_argument("--output-json", default=None,
                   help="append the figures as one JSON line (with machine and command)")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="the model's vocabulary, for token-id fuzz values (random model: 1000)")


def run(args: argparse.Namespace) -> dict:
    streams = args.streams or (256 if args.long else 64)
    per_endpoint = args.fuzz_per_endpoint or (2000 if args.long else 200)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from octavo.bench.make_random_model import make_random_model
            model = make_random_model(tmp, "llama-tiny", "float32") and tmp
        report: dict[str, Any] = {}
        # One server whose KV cache is far too small for the offered load: the streams run
        # through preemptions too.
        with ServerProcess(model, ["--dtype", "float32", "--max-model-len", "256",
                                   "--block-size", "16",
                                   "--kv-cache-memory", args.small_kv_cache]) as srv:
            report["streams"] = stream_workload(srv.url, streams, 32, seed=args.seed)
            report["fuzz"] = run_fuzz(srv.url, fuzz_cases(args.seed, per_endpoint,
                                                          args.vocab_size))
            before = metrics(srv.url)["octavo:num_preemptions_total"]
            report["kv_exhaustion"] = stream_workload(srv.url, streams // 2, 48,
                                                      leave_every=None, seed=args.seed + 1)
            preempted = metrics(srv.url)["octavo:num_preemptions_total"] - before
            report["kv_exhaustion"]["preemptions"] = preempted
            if not preempted:
                report["kv_exhaustion"]["problems"].append(
                    "nothing was preempted: give a smaller --small-kv-cache")
            report["idle"] = wait_idle(srv.url)
    failures = 0
    for name, part in report.items():
        if name == "idle":
            continue
        figures = {k: v for k, v in part.items() if k not in ("problems", "failures")}
        bad = part.get("problems", part.get("failures", []))
        failures += len(bad)
        print(f"{name}: {figures}; {len(bad)} failure(s)")
        for line in bad[:20]:
            print("   ", line)
    idle = report["idle"]
    print(f"after the load: running {idle['octavo:num_requests_running']:.0f}, waiting "
          f"{idle['octavo:num_requests_waiting']:.0f}, free KV blocks "
          f"{idle['octavo:kv_cache_free_blocks']:.0f}/{idle['octavo:kv_cache_total_blocks']:.0f}")
    from octavo.bench.utils import write_jsonl
    write_jsonl(args.output_json, {"suite": "stress", "long": args.long, "failures": failures,
                                   **{name: {k: v for k, v in part.items()
                                             if k not in ("problems", "failures")}
                                      for name, part in report.items() if name != "idle"}})
    if failures:
        raise SystemExit(1)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
