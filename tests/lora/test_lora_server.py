"""LoRA on the OpenAI server: --lora-modules adapters listed in /v1/models and selected by
"model" (outputs equal to the offline API's with the same adapter), run-time load / unload,
and the errors in OpenAI's shape."""
from __future__ import annotations

import os
import sys

import httpx
import pytest

from lora_util import save_adapter
from octavo import LLM, SamplingParams
from octavo.lora.request import LoRARequest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "entrypoints"))
from server_util import RunningServer  # noqa: E402

KV = 1 << 24


@pytest.fixture(scope="module")
def setup(chat_model_dir, tmp_path_factory):
    base = chat_model_dir                  # a tokenizer with a chat template, for the chat call
    root = tmp_path_factory.mktemp("srv_adapters")
    return (base, save_adapter(base, str(root / "sql"), seed=11, r=8),
            save_adapter(base, str(root / "poem"), seed=12, r=4, targets=("q_proj", "down_proj")))


def offline_tokens(base, adapter, prompt, n):
    llm = LLM(model=base, dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory=KV)
    lora = LoRARequest("x", 1, adapter) if adapter else None
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n), use_tqdm=False,
                       lora_request=lora)
    return out[0].outputs[0].text


def test_lora_modules_models_load_unload(setup):
    base, sql, poem = setup
    argv = [base, "--dtype", "float32", "--kv-cache-memory", str(KV), "--enable-lora",
            "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", f"sql={sql}"]
    prompt = "Hello, my name is"
    with RunningServer(argv) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        cards = {m["id"]: m for m in models}
        assert set(cards) == {base, "sql"}
        assert cards["sql"]["root"] == sql and cards["sql"]["parent"] == base

        def complete(model):
            r = httpx.post(srv.url + "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            return r.json()["choices"][0]["text"]

        assert complete("sql") == offline_tokens(base, sql, prompt, 8)
        assert complete(base) == offline_tokens(base, None, prompt, 8)
        assert complete("sql") != complete(base)

        r = httpx.post(srv.url + "/v1/load_lora_adapter",
                       json={"lora_name": "poem", "lora_path": poem})
        assert r.status_code == 200 and "poem" in r.text
        assert {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]} == \
            {base, "sql", "poem"}
        assert complete("poem") == offline_tokens(base, poem, prompt, 8)
        chat = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": "poem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=60)
        assert chat.status_code == 200 and chat.json()["model"] == "poem"

        again = httpx.post(srv.url + "/v1/load_lora_adapter",
                           json={"lora_name": "poem", "lora_path": poem})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        bad = httpx.post(srv.url + "/v1/load_lora_adapter",
                         json={"lora_name": "bad", "lora_path": "/no/such/dir"})
        assert bad.status_code == 400 and "is not a directory" in bad.json()["error"]["message"]

        r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "poem"})
        assert r.status_code == 200
        assert {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]} == {base, "sql"}
        assert srv.ctx.engine.engine.list_loras() == {srv.ctx.lora_requests["sql"].lora_int_id}
        gone = httpx.post(srv.url + "/v1/completions", json={"model": "poem", "prompt": "x"})
        assert gone.status_code == 404
        missing = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "poem"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


def test_bad_lora_modules_stop_the_server(setup):
    base, _, _ = setup
    with pytest.raises(ValueError, match="needs --enable-lora"):
        RunningServer([base, "--kv-cache-memory", str(KV), "--lora-modules", "a=/x"])
    with pytest.raises(ValueError, match="name=path"):
        RunningServer([base, "--kv-cache-memory", str(KV), "--enable-lora", "--lora-modules",
                       "nopath"])
