"""The `octavo` console script, run as a subprocess: --help, generate, chat from a pipe
(checked against LLM.generate / LLM.chat in this process), errors, serve, and the README's
`octavo generate "Once upon a time"` on the default model."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from octavo import LLM, SamplingParams

KV = ["--kv-cache-memory", "16M"]


def octavo(*args, stdin=None, timeout=300):
    exe = shutil.which("octavo")
    cmd = [exe] if exe else [sys.executable, "-m", "octavo.entrypoints.cli"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def llm(chat_model_dir):
    return LLM(chat_model_dir, kv_cache_memory=1 << 24)


def test_help_lists_every_command_and_flag():
    top = octavo("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("generate", "chat", "serve", "bench"))
    gen = octavo("generate", "--help").stdout
    for flag in ("--model", "--temperature", "--top-p", "--top-k", "--max-tokens", "--seed",
                 "--stop", "--dtype", "--max-model-len", "--kv-cache-memory",
                 "--generation-config", "PROMPT"):
        assert flag in gen, flag
    chat = octavo("chat", "--help").stdout
    assert "--system" in chat and "--chat-template" in chat and "--max-tokens" in chat
    serve = octavo("serve", "--help")
    assert serve.returncode == 0 and "--port" in serve.stdout and "model" in serve.stdout


def test_generate_matches_llm(llm, chat_model_dir):
    prompts = ["Hello, my name is", "The capital of France is"]
    res = octavo("generate", *prompts, "--model", chat_model_dir, "--temperature", "0",
                 "--max-tokens", "6", *KV)
    assert res.returncode == 0, res.stderr
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    expected = "".join(f"--- prompt {i}, completion 0: {p!r}\n{o.outputs[0].text}\n"
                       for i, (p, o) in enumerate(zip(prompts, outs)))
    assert res.stdout == expected      # (one prompt prints prompt + completion: README test)


def test_chat_from_a_pipe_keeps_the_conversation(llm, chat_model_dir):
    res = octavo("chat", "--model", chat_model_dir, "--temperature", "0", "--max-tokens", "5",
                 "--system", "be brief", *KV, stdin="Hello\n\nHow are you?\n/exit\nignored\n")
    assert res.returncode == 0, res.stderr
    params = SamplingParams(temperature=0, max_tokens=5)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"}]
    first = llm.chat(msgs, params, use_tqdm=False)[0].outputs[0].text
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = llm.chat(msgs, params, use_tqdm=False)[0].outputs[0].text
    assert res.stdout == f"{first}\n{second}\n"


def test_errors_say_what_to_change(llama_dir, chat_model_dir):
    bad = octavo("generate", "x", "--model", chat_model_dir, "--top-p", "2", *KV)
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr
    no_template = octavo("chat", "--model", llama_dir, *KV, stdin="hi\n")
    assert no_template.returncode == 2 and "chat template" in no_template.stderr
    size = octavo("generate", "x", "--kv-cache-memory", "lots")
    assert size.returncode == 2 and "not a size" in size.stderr


def test_serve_delegates_to_the_openai_server(chat_model_dir):
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("octavo")
    cmd = [exe] if exe else [sys.executable, "-m", "octavo.entrypoints.cli"]
    proc = subprocess.Popen(cmd + ["serve", chat_model_dir, "--port", str(port),
                                   "--kv-cache-memory", "16M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == chat_model_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_readme_example_on_default_model(default_gguf):
    res = octavo("generate", "Once upon a time", "--max-tokens", "12", "--temperature", "0",
                 "--max-model-len", "256", timeout=600)
    assert res.returncode == 0, res.stderr
    text = res.stdout.strip()
    assert text.startswith("Once upon a time") and len(text.split()) >= 8
    words = text.split()[4:]
    assert sum(w.strip(",.!?'\"").isalpha() for w in words) >= len(words) - 2   # English words


# vLLM's common `vllm serve` flags (its documentation's engine arguments and server options),
# which `octavo serve` accepts so that a vLLM command line runs unchanged.
VLLM_SERVE_FLAGS = (
    "--host", "--port", "--root-path", "--api-key", "--served-model-name", "--chat-template",
    "--response-role", "--uvicorn-log-level", "--disable-log-requests", "--enable-log-requests",
    "--disable-log-stats", "--model", "--tokenizer", "--revision", "--tokenizer-revision",
    "--download-dir", "--tokenizer-mode", "--trust-remote-code", "--runner", "--dtype",
    "--max-model-len", "--load-format", "--generation-config", "--seed", "--max-logprobs",
    "--quantization", "-q", "--kv-cache-dtype", "--block-size", "--enable-prefix-caching",
    "--no-enable-prefix-caching", "--gpu-memory-utilization", "--swap-space",
    "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--max-num-seqs",
    "--max-num-batched-tokens", "--enforce-eager")


def test_serve_help_lists_vllm_flags():
    res = octavo("serve", "--help")
    assert res.returncode == 0
    words = set(res.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    missing = [f for f in VLLM_SERVE_FLAGS if f not in words]
    assert not missing, missing


def test_generate_accepts_vllm_engine_flags(chat_model_dir):
    """Flags that are vLLM's (some without effect) leave the output as LLM.generate gives it;
    the ones octavo cannot honour fail with a message, not a traceback."""
    prompt = "The capital of France is"
    res = octavo("generate", prompt, "--model", chat_model_dir, "--temperature", "0",
                 "--max-tokens", "5", "--runner", "auto", "--generation-config", "vllm",
                 "--max-logprobs", "5", "--swap-space", "1", "--disable-log-stats",
                 "--engine-seed", "3", "-tp", "1", "-pp", "1", "--load-format", "safetensors",
                 "--kv-cache-dtype", "auto", "--tokenizer-mode", "auto", *KV)
    assert res.returncode == 0, res.stderr
    llm = LLM(chat_model_dir, kv_cache_memory=1 << 24, generation_config="octavo")
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert res.stdout == prompt + out[0].outputs[0].text + "\n"
    pooling = octavo("generate", "x", "--model", chat_model_dir, "--runner", "pooling", *KV)
    assert pooling.returncode == 2 and "Traceback" not in pooling.stderr
    assert "not supported: octavo runs generative models only" in pooling.stderr
    e5m2 = octavo("generate", "x", "--model", chat_model_dir, "--kv-cache-dtype", "fp8_e5m2", *KV)
    assert e5m2.returncode == 2 and "kv_cache_dtype='fp8_e5m2' is not supported" in e5m2.stderr
    bad = octavo("generate", "x", "--load-format", "npcache")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_serve_with_vllm_flags(chat_model_dir):
    """A vLLM-style command line: the served name, API key, response role and max_logprobs
    all take effect; a request over max_logprobs gets a 400 in OpenAI's shape."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("octavo")
    cmd = [exe] if exe else [sys.executable, "-m", "octavo.entrypoints.cli"]
    proc = subprocess.Popen(cmd + ["serve", chat_model_dir, "--host", "127.0.0.1", "--port",
                                   str(port), "--served-model-name", "tiny", "--api-key", "k",
                                   "--response-role", "bot", "--max-logprobs", "2",
                                   "--disable-log-requests", "--disable-log-stats",
                                   "--uvicorn-log-level", "warning", "--swap-space", "0",
                                   "--no-enable-prefix-caching", "-tp", "1",
                                   "--kv-cache-memory", "16M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        chat = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "bot"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        ok = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                        json={**body, "logprobs": 2})
        assert ok.status_code == 200, ok.text
        over = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                          json={**body, "logprobs": 3})
        assert over.status_code == 400 and "max_logprobs=2" in over.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
