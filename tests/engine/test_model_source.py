"""What `model` means (octavo.model_source): Hub ids resolved offline from a Hub cache laid out
here (models--org--name/snapshots/REV, refs/main) generate exactly what the snapshot directory
generates; revision= picks the snapshot; the files fetched online are the ones loading needs;
errors list every interpretation tried."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tiny_models import build_tiny_model
from octavo import LLM, SamplingParams
from octavo.model_source import files_to_fetch, hub_id, resolve_model

REPO = "octavo-test/tiny-llama"
REV_MAIN = "1" * 40
REV_OTHER = "2" * 40
KV = dict(kv_cache_memory=1 << 24, dtype="float32")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, llama_dir):
    """A Hugging Face Hub cache holding two snapshots of REPO: main (the session's tiny Llama)
    and a branch 'other' (different weights)."""
    cache = tmp_path_factory.mktemp("hub")
    storage = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(llama_dir, storage / "snapshots" / REV_MAIN)
    build_tiny_model(str(storage / "snapshots" / REV_OTHER), "LlamaForCausalLM", seed=1)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REV_MAIN)
    (storage / "refs" / "other").write_text(REV_OTHER)
    return str(cache)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def greedy(llm, n=8):
    prompts = ["Hello, my name is", "The capital of France is"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_hub_id_generates_what_the_directory_generates(hub_cache, offline):
    snapshot = os.path.join(hub_cache, "models--octavo-test--tiny-llama", "snapshots", REV_MAIN)
    llm = LLM(REPO, download_dir=hub_cache, **KV)
    config = llm.llm_engine.config
    assert config.model == snapshot and config.model_name == REPO
    assert greedy(llm) == greedy(LLM(snapshot, **KV))


def test_revision_picks_the_snapshot(hub_cache, offline):
    base = os.path.join(hub_cache, "models--octavo-test--tiny-llama", "snapshots")
    assert resolve_model(REPO, None, hub_cache).path == os.path.join(base, REV_MAIN)
    assert resolve_model(REPO, "other", hub_cache).path == os.path.join(base, REV_OTHER)
    assert resolve_model(REPO, REV_OTHER, hub_cache).path == os.path.join(base, REV_OTHER)
    other = LLM(REPO, revision="other", download_dir=hub_cache, **KV)
    assert greedy(other) == greedy(LLM(os.path.join(base, REV_OTHER), **KV))


def test_errors_list_what_was_tried(hub_cache, offline, tmp_path):
    with pytest.raises(ValueError) as e:
        LLM("octavo-test/missing", download_dir=hub_cache, **KV)
    msg = str(e.value)
    assert "a local path" in msg and "does not exist" in msg
    assert "Hub id ('octavo-test/missing')" in msg and "offline" in msg
    assert hub_cache in msg and "octavo download octavo-test/missing" in msg
    with pytest.raises(ValueError, match=r"revision 'nope'.*not in the Hub cache"):
        resolve_model(REPO, "nope", hub_cache)
    with pytest.raises(ValueError, match=r"local path.*it is not one \(expected 'name', 'org/name'"):
        resolve_model("no such/dir/at all", None, hub_cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither config.json .* nor a .gguf"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_local_path_wins_over_a_hub_id(hub_cache, offline, llama_dir, tmp_path, monkeypatch):
    # a directory named like a Hub id, relative to the working directory
    target = tmp_path / "octavo-test" / "tiny-llama"
    shutil.copytree(llama_dir, target)
    monkeypatch.chdir(tmp_path)
    source = resolve_model(REPO, None, hub_cache)
    assert source.kind == "local" and source.path == REPO


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    """Online but the Hub cannot be reached: the cached snapshot is used, and a repo that is
    not cached says the Hub was unreachable (no network is touched: the listing is faked)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("OCTAVO_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(self, *args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    snap = resolve_model(REPO, None, hub_cache).path
    assert snap.endswith(REV_MAIN)
    with pytest.raises(ValueError, match="the Hub is unreachable .*no route to huggingface.co"):
        resolve_model("octavo-test/missing", None, hub_cache)


def test_online_fetch_asks_only_for_what_loading_needs(hub_cache, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("OCTAVO_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    listing = ["config.json", "generation_config.json", "model.safetensors",
               "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "README.md",
               "onnx/model.onnx", "original/consolidated.safetensors", "model.gguf"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, revision=None: listing)
    asked = {}

    def fake_snapshot(repo, **kwargs):
        asked.update(kwargs, repo=repo)
        return os.path.join(hub_cache, "models--octavo-test--tiny-llama", "snapshots", REV_MAIN)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    resolve_model(REPO, "v1", hub_cache)
    assert asked["repo"] == REPO and asked["revision"] == "v1" and asked["cache_dir"] == hub_cache
    assert asked["local_files_only"] is False
    assert sorted(asked["allow_patterns"]) == ["config.json", "generation_config.json",
                                               "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"]


def test_files_to_fetch():
    assert files_to_fetch("o/n", ["config.json", "pytorch_model-00001-of-00002.bin",
                                  "pytorch_model-00002-of-00002.bin", "training_args.bin",
                                  "pytorch_model.bin.index.json", "vocab.txt", "modeling_x.py"]
                          ) == ["config.json", "pytorch_model.bin.index.json", "vocab.txt",
                                "modeling_x.py", "pytorch_model-00001-of-00002.bin",
                                "pytorch_model-00002-of-00002.bin"]
    assert files_to_fetch("o/n", ["README.md", "m.Q4_0.gguf", "config.json.bak"]) == ["m.Q4_0.gguf"]
    from octavo.model_source import _NotHere
    with pytest.raises(_NotHere, match="several GGUF files .*'o/n/FILE.gguf'"):
        files_to_fetch("o/n", ["a.gguf", "b.gguf"])
    with pytest.raises(_NotHere, match="no \\*.safetensors or pytorch_model"):
        files_to_fetch("o/n", ["config.json", "tf_model.h5"])


def test_hub_id_forms():
    assert hub_id("org/name") == ("org/name", None)
    assert hub_id("gpt2") == ("gpt2", None)
    assert hub_id("org/name-GGUF/sub/m.Q4_K.gguf") == ("org/name-GGUF", "sub/m.Q4_K.gguf")
    assert hub_id("a/b/c") is None and hub_id("bad--name/x") is None
    assert hub_id("model.gguf") is None and hub_id("models/m.gguf") is None   # missing files


def test_download_command_prints_the_snapshot(hub_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "octavo.entrypoints.cli", "download", REPO,
                          "--revision", "other", "--download-dir", hub_cache],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.join(hub_cache, "models--octavo-test--tiny-llama",
                                              "snapshots", REV_OTHER)
    bad = subprocess.run([sys.executable, "-m", "octavo.entrypoints.cli", "download",
                          "octavo-test/missing", "--download-dir", hub_cache],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "offline" in bad.stderr and "Traceback" not in bad.stderr
