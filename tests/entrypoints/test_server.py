"""The OpenAI-compatible server end to end: a real uvicorn server on a tiny chat model, driven by
the official `openai` client and httpx, checked against LLM.generate and transformers."""
import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from tiny_models import CHAT_TEMPLATE
from server_util import RunningServer, free_port, metric_value

from octavo import LLM, SamplingParams
from octavo.async_engine import AsyncLLMEngine
from octavo.entrypoints.openai.cli_args import engine_config, make_arg_parser, parse_bytes

KEY = "sk-octavo-test"
MODEL = "tiny"
MIB = 1 << 20
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, there was a little robot",
    "The quick brown fox jumps over the lazy dog.",
]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(chat_model_dir):
    argv = [chat_model_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
            "--served-model-name", MODEL, "--api-key", KEY, "--uvicorn-log-level", "warning"]
    with RunningServer(argv) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm(chat_model_dir):
    return LLM(chat_model_dir, dtype="float32", kv_cache_memory=16 * MIB)


def greedy(llm, prompts, max_tokens, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def chat_ids(llm, messages):
    """The chat prompt's token ids, rendered by transformers itself."""
    return llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)


def test_completion_matches_llm_generate(client, llm):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0,
                                     extra_body=NO_EOS)
    ref = greedy(llm, PROMPTS, 10, ignore_eos=True)
    assert resp.object == "text_completion" and resp.model == MODEL
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [r.text for r in ref]
    assert all(c.finish_reason == "length" for c in resp.choices)
    tok = llm.get_tokenizer()
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    assert resp.usage.prompt_tokens == prompt_tokens
    assert resp.usage.completion_tokens == 40
    assert resp.usage.total_tokens == prompt_tokens + 40


def test_token_id_prompt_and_echo(client, llm):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                     echo=True, extra_body=NO_EOS)
    ref = greedy(llm, [{"prompt_token_ids": ids}], 6, ignore_eos=True)[0]
    assert resp.choices[0].text == llm.get_tokenizer().decode(ids) + ref.text
    assert resp.usage.prompt_tokens == len(ids)


def test_chat_matches_llm_generate(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                          temperature=0, extra_body=NO_EOS)
    ids = chat_ids(llm, messages)
    ref = greedy(llm, [{"prompt_token_ids": ids}], 12, ignore_eos=True)[0]
    msg = resp.choices[0].message
    assert resp.object == "chat.completion"
    assert msg.role == "assistant" and msg.content == ref.text
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == 12


def test_streaming_chat_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
              max_tokens=20, temperature=0, extra_body=NO_EOS)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streaming_completion_with_stop_string(client, llm):
    """A stop string cut from the greedy text: streamed and whole replies both end before it
    (the stream never shows a partial stop string)."""
    full = greedy(llm, [PROMPTS[2]], 24, ignore_eos=True)[0].text
    stop = full[8:11]
    expected = full[:full.index(stop)]
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop],
              extra_body=NO_EOS)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].stop_reason == stop
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def _hf_logprobs(model_dir, prompt_ids, output_ids, k):
    """Per generated token: (its logprob, the top-k logprobs), from transformers."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logp[len(prompt_ids) - 1:-1]
    return [(rows[i, t].item(), rows[i].topk(k).values.tolist())
            for i, t in enumerate(output_ids)]


def test_logprobs_match_transformers(client, llm, chat_model_dir):
    tok = llm.get_tokenizer()
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                     logprobs=3, extra_body=NO_EOS)
    out_ids = greedy(llm, [PROMPTS[0]], 6, ignore_eos=True)[0].token_ids
    ref = _hf_logprobs(chat_model_dir, tok.encode(PROMPTS[0]), out_ids, 3)
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == 6
    for got, top, (want, want_top) in zip(lp.token_logprobs, lp.top_logprobs, ref):
        assert got == pytest.approx(want, abs=1e-4)
        assert max(top.values()) == pytest.approx(want_top[0], abs=1e-4)
        # keyed by token text, so tokens with the same text share one entry
        assert all(any(abs(v - w) < 1e-4 for w in want_top) for v in top.values())

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=4,
                                          extra_body=NO_EOS)
    ids = chat_ids(llm, messages)
    out_ids = greedy(llm, [{"prompt_token_ids": ids}], 5, ignore_eos=True)[0].token_ids
    ref = _hf_logprobs(chat_model_dir, ids, out_ids, 4)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry, (want, want_top) in zip(content, ref):
        assert entry.logprob == pytest.approx(want, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(want_top, abs=1e-4)


def test_prompt_logprobs_match_transformers(client, llm, chat_model_dir):
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                     extra_body={"prompt_logprobs": 2})
    got = resp.choices[0].model_extra["prompt_logprobs"]
    ref = _hf_logprobs(chat_model_dir, ids[:1], ids[1:], 2)
    assert got[0] is None and len(got) == len(ids)
    for entry, tok, (want, want_top) in zip(got[1:], ids[1:], ref):
        assert entry[str(tok)]["logprob"] == pytest.approx(want, abs=1e-4)
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert ranked[0]["logprob"] == pytest.approx(want_top[0], abs=1e-4)


def test_n2_sampling(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, max_tokens=8,
                                     temperature=1.0, seed=7, extra_body=NO_EOS)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, n=2, max_tokens=5, temperature=1.0,
                                          messages=[{"role": "user", "content": "Hi"}],
                                          extra_body=NO_EOS)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens == 10


def _assert_error_shape(body, status):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]


def test_bad_requests_get_openai_errors(client, server, llm):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    _assert_error_shape(e.value.response.json(), 400)
    assert "temperature" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi")
    _assert_error_shape(e.value.response.json(), 404)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello " * 600, max_tokens=4)
    assert "context length" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}], n=2,
                                       temperature=0)
    _assert_error_shape(e.value.response.json(), 400)
    with pytest.raises(openai.BadRequestError) as e:      # refused by the engine itself
        client.completions.create(model=MODEL, prompt="Hi", logit_bias={"100000": 5})
    assert "out of vocabulary" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", stream=True,
                                  extra_body={"prompt_logprobs": 1})
    _assert_error_shape(e.value.response.json(), 400)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers=headers)
    assert r.status_code == 400
    _assert_error_shape(r.json(), 400)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # and it keeps serving
    ok = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                   extra_body=NO_EOS)
    assert ok.choices[0].text == greedy(llm, [PROMPTS[1]], 4, ignore_eos=True)[0].text


def test_wrong_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    _assert_error_shape(e.value.response.json(), 401)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert r.status_code == 401
    _assert_error_shape(r.json(), 401)


def _metrics(server):
    return httpx.get(server.url + "/metrics").text


def test_aborted_stream_frees_blocks(client, server):
    before = metric_value(_metrics(server), "octavo:request_success_total",
                          finished_reason="abort")
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=480,
                                       temperature=0, stream=True, extra_body=NO_EOS)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = _metrics(server)
        aborted = metric_value(text, "octavo:request_success_total", finished_reason="abort")
        if aborted == before + 1 and metric_value(text, "octavo:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.05)
    assert aborted == before + 1, "the disconnected stream was not aborted"
    assert metric_value(text, "octavo:kv_cache_usage_perc") == 0.0
    assert metric_value(text, "octavo:num_requests_running") == 0.0
    kv = server.ctx.engine.engine.kv
    assert kv.pool.num_free == kv.num_blocks


def test_client_leaving_a_non_streamed_request_aborts_it(server):
    before = metric_value(_metrics(server), "octavo:request_success_total",
                          finished_reason="abort")
    body = {"model": MODEL, "prompt": [f"{p} again" for p in PROMPTS] * 2, "max_tokens": 480,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.2,
                   headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = _metrics(server)
        aborted = metric_value(text, "octavo:request_success_total", finished_reason="abort")
        if aborted == before + 8 and metric_value(text, "octavo:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert aborted == before + 8
    kv = server.ctx.engine.engine.kv
    assert kv.pool.num_free == kv.num_blocks


def test_32_concurrent_streams(server, llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    ref = [r.text for r in greedy(llm, prompts, 12, ignore_eos=True)]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                                  temperature=0, stream=True, extra_body=NO_EOS)
        return "".join([c.choices[0].text async for c in stream])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY,
                                      max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(run_all()) == ref


def test_tokenize_detokenize(server, llm):
    tok = llm.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPTS[0],
                                                   "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPTS[0]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert r["tokens"] == chat_ids(llm, messages)
    r = httpx.post(server.url + "/detokenize", json={"model": MODEL,
                                                     "tokens": tok.encode(PROMPTS[1])})
    assert r.json() == {"prompt": tok.decode(tok.encode(PROMPTS[1]))}
    r = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": [10 ** 6]})
    assert r.status_code == 400
    _assert_error_shape(r.json(), 400)


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    text = _metrics(server)
    for name in ("octavo:num_requests_running", "octavo:num_requests_waiting",
                 "octavo:kv_cache_usage_perc", "octavo:prompt_tokens_total",
                 "octavo:generation_tokens_total", "octavo:time_to_first_token_seconds_count",
                 "octavo:inter_token_latency_seconds_count"):
        metric_value(text, name, model_name=MODEL)
    gen_before = metric_value(text, "octavo:generation_tokens_total")
    length_before = metric_value(text, "octavo:request_success_total", finished_reason="length")
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                              extra_body=NO_EOS)
    text = _metrics(server)
    assert metric_value(text, "octavo:generation_tokens_total") == gen_before + 5
    assert metric_value(text, "octavo:request_success_total",
                        finished_reason="length") == length_before + 1


def test_cors_preflight(server):
    r = httpx.options(server.url + "/v1/models", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "GET"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.com")
    assert json.loads(httpx.get(server.url + "/v1/models",
                                headers={"Authorization": f"Bearer {KEY}"}).text)["data"]


def test_failing_step_fails_its_requests_not_the_loop(llm):
    """A step that raises fails the requests in flight; the loop keeps serving new ones."""
    engine = llm.llm_engine
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    engine.step = flaky_step
    aengine = AsyncLLMEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def run():
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in aengine.generate("fails", PROMPTS[0], params):
                pass
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await aengine.add_request("bad", {"prompt_token_ids": [10 ** 6]}, params)
        return [o async for o in aengine.generate("works", PROMPTS[0], params)][-1]

    try:
        last = asyncio.run(run())
    finally:
        aengine.shutdown()
        del engine.step
    assert last.finished and last.outputs[0].text == greedy(llm, [PROMPTS[0]], 5,
                                                            ignore_eos=True)[0].text
    assert engine.kv.pool.num_free == engine.kv.num_blocks


def test_cli_args(llama_dir):
    args = make_arg_parser().parse_args([llama_dir, "--kv-cache-memory", "512MiB",
                                         "--no-enable-prefix-caching", "--max-model-len", "256",
                                         "--served-model-name", "a", "b"])
    config = engine_config(args)
    assert config.kv_cache_memory == 512 * MIB and not config.enable_prefix_caching
    assert config.max_model_len == 256 and args.served_model_name == ["a", "b"]
    assert not config.enforce_eager and not config.trust_remote_code
    flags = engine_config(make_arg_parser().parse_args([llama_dir, "--enforce-eager",
                                                      "--trust-remote-code"]))
    assert flags.enforce_eager and flags.trust_remote_code
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("1e6") == 10 ** 6
    with pytest.raises(SystemExit):
        make_arg_parser().parse_args([llama_dir, "--kv-cache-memory", "lots"])


def test_run_server_subprocess(llama_dir):
    """The entry point `octavo serve` calls (run_server) as its own process, on a model whose
    tokenizer has no chat template, so chat works only through --chat-template."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "octavo.entrypoints.openai.api_server", llama_dir,
         "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "16MiB",
         "--served-model-name", MODEL, "--chat-template", CHAT_TEMPLATE,
         "--uvicorn-log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out


def test_unhandled_error_is_a_500_in_openai_shape_on_a_live_connection(server, monkeypatch):
    """An error no handler expects answers 500 in OpenAI's shape, and the keep-alive
    connection it came on still serves the next request (uvicorn reset it before)."""
    import socket

    async def broken_add_request(*args, **kwargs):
        raise TypeError("a bug nobody expected")

    monkeypatch.setattr(server.ctx.engine, "add_request", broken_add_request)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (KEY.encode(), len(body), body))

    def read_reply(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        return head, rest

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        head, rest = read_reply(sock)
        assert head.startswith(b"HTTP/1.1 500") and b"connection: close" not in head.lower()
        _assert_error_shape(json.loads(rest), 500)
        assert "a bug nobody expected" in json.loads(rest)["error"]["message"]
        monkeypatch.undo()
        sock.sendall(request)                         # the same connection, now working
        head, rest = read_reply(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(rest)["usage"]["completion_tokens"] == 2


def test_prompt_token_ids_out_of_range_are_400_before_the_tokenizer(client):
    for ids in ([5, -1], [2 ** 63 - 1], [10 ** 6]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=ids, max_tokens=2)
        _assert_error_shape(e.value.response.json(), 400)
        assert "outside the vocabulary" in e.value.response.json()["error"]["message"]


def test_request_chat_template_needs_the_servers_consent(client):
    """A template is a program (two nested loops run for ever): refused unless the server
    runs with --trust-request-chat-template, as vLLM does."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={"chat_template": "{% for a in range(99999) %}{% for b in range(99999) "
                                         "%}x{% endfor %}{% endfor %}"})
    _assert_error_shape(e.value.response.json(), 400)
    assert "--trust-request-chat-template" in e.value.response.json()["error"]["message"]
