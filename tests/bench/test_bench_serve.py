"""octavo bench serve against a fake OpenAI-compatible streaming server, and against octavo's
own server when `octavo serve` exists."""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from fake_openai_server import TOKEN_DELAY_S, FakeServer, free_port
from octavo.bench import serve


def _run(base_url, model, tmp_path, *extra):
    out = tmp_path / "serve.jsonl"
    serve.main(["--base-url", base_url, "--model", model, "--num-prompts", "6",
                "--input-len", "8", "--output-len", "5", "--output-json", str(out), *extra])
    (rec,) = [json.loads(line) for line in open(out)]
    return rec


def _check_ordered(rec):
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < rec[f"mean_{name}_ms"] and rec[f"median_{name}_ms"] <= rec[f"p99_{name}_ms"]
    assert rec["median_ttft_ms"] <= rec["median_e2el_ms"]


def test_fake_server_poisson_rate(tmp_path, capsys):
    with FakeServer() as srv:
        rec = _run(srv.base_url, "fake", tmp_path, "--request-rate", "100", "--max-concurrency", "2")
        bodies = srv.app.state.requests
    assert rec["completed"] == 6 and rec["failed"] == 0
    assert rec["total_output_tokens"] == 6 * 5 and rec["total_input_tokens"] == 6 * 8
    assert rec["request_throughput"] == pytest.approx(6 / rec["duration"])
    assert rec["output_throughput"] == pytest.approx(30 / rec["duration"])
    _check_ordered(rec)
    assert rec["median_itl_ms"] >= TOKEN_DELAY_S * 1e3 * 0.9       # the server's own pacing
    assert len(bodies) == 6 and all(b["stream"] and b["max_tokens"] == 5 for b in bodies)
    text = capsys.readouterr().out
    assert "Successful requests:" in text and "Median TTFT (ms):" in text and "P99 ITL (ms):" in text


def test_text_prompts(llama_dir, tmp_path):
    with FakeServer() as srv:
        rec = _run(srv.base_url, "fake", tmp_path, "--tokenizer", llama_dir, "--prompt-format", "text")
        bodies = srv.app.state.requests
    assert rec["completed"] == 6 and all(isinstance(b["prompt"], str) and b["prompt"] for b in bodies)


def test_failed_requests_are_counted(tmp_path):
    with FakeServer() as srv:
        # max_tokens is overridden to 0: the fake server answers 400 to every request
        rec = _run(srv.base_url, "fake", tmp_path, "--extra-body", '{"max_tokens": 0}')
    assert rec["completed"] == 0 and rec["failed"] == 6
    assert any("HTTP 400" in e for e in rec["errors"])


def test_unreachable_server_counts_failures(tmp_path):
    rec = _run(f"http://127.0.0.1:{free_port()}", "fake", tmp_path, "--request-timeout", "5")
    assert rec["failed"] == 6 and rec["completed"] == 0


def _octavo_server_command(model: str, port: int) -> list[str] | None:
    """How to start octavo's own server, or None (with the reason printed) if it has not landed."""
    import importlib.util
    if importlib.util.find_spec("octavo.entrypoints.openai.api_server") is None:
        return None
    return [sys.executable, "-m", "octavo.entrypoints.openai.api_server", model,
            "--port", str(port), "--uvicorn-log-level", "warning"]


def test_against_octavo_server(llama_dir, tmp_path):
    port = free_port()
    cmd = _octavo_server_command(llama_dir, port)
    if cmd is None:
        reason = "octavo's server (octavo.entrypoints.openai.api_server) has not landed"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"octavo serve exited: {proc.stdout.read()[-2000:]}"
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "octavo serve did not answer /v1/models in 120 s"
            time.sleep(0.5)
        name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        rec = _run(base, name, tmp_path, "--tokenizer", llama_dir, "--max-concurrency", "3")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert rec["completed"] == 6 and rec["failed"] == 0, rec["errors"]
    assert rec["total_output_tokens"] == 6 * 5 and rec["total_input_tokens"] == 6 * 8
    _check_ordered(rec)
