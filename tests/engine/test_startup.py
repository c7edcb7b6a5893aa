"""Start-up stays quick: no profiling forward on the CPU (the KV budget there is a setting), a
GGUF header parsed once (not with gguf.GGUFReader, not by transformers' GGUF checkpoint
reader), and what replaced those (the config, the tokenizer, the block dequantization) equal to
what transformers and the gguf package produce."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tiny_models import TINY_COMMON
from octavo import LLM, SamplingParams, default_model
from octavo.model_runner import ModelRunner
from octavo.models import gguf_loader
from tokenizer_util import make_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from gguf_util import write_llama_gguf  # noqa: E402

KV = dict(kv_cache_memory=1 << 24, dtype="float32")
TEXTS = ["Hello, my name is", "The capital of France is Paris.", " leading space",
         "ünïcödé and 你好 and emoji 🙂", "tabs\tand\nnew lines  ", ""]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup_gguf")
    tok = make_tokenizer()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"],
                                  **{**TINY_COMMON, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    alone = tmp_path_factory.mktemp("startup_gguf_alone")      # as a .gguf usually lives
    return write_llama_gguf(str(path), str(alone / "tiny.gguf"))


def gguf_files(tiny_gguf):
    """The tiny file, and the default model where it already is on this machine."""
    files = [tiny_gguf]
    for path in (default_model.installed_path(), default_model.cached_path()):
        if path and os.path.isfile(path):
            files.append(path)
            break
    else:
        print("default model not installed or cached: only the tiny GGUF is compared")
    return files


def test_cpu_start_runs_no_forward(llama_dir, monkeypatch):
    calls = []
    real_execute = ModelRunner.execute

    def counting(self, out):
        calls.append(len(out.scheduled))
        return real_execute(self, out)

    def no_profile(self):
        raise AssertionError("profile_run ran on the CPU")

    monkeypatch.setattr(ModelRunner, "execute", counting)
    monkeypatch.setattr(ModelRunner, "profile_run", no_profile)
    llm = LLM(llama_dir, device="cpu", max_model_len=512, **KV)
    assert calls == []                                    # ready without any forward
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert calls and len(out[0].outputs[0].token_ids) == 3


def test_gguf_header_is_parsed_once(tiny_gguf, monkeypatch):
    import gguf
    import transformers.modeling_gguf_pytorch_utils as tf_gguf

    def slow_reader(*a, **k):
        raise AssertionError("a slow GGUF reader was used")

    monkeypatch.setattr(gguf, "GGUFReader", slow_reader)
    monkeypatch.setattr(tf_gguf, "load_gguf_checkpoint", slow_reader)
    gguf_loader._read_header.cache_clear()
    llm = LLM(tiny_gguf, **KV)
    info = gguf_loader._read_header.cache_info()
    assert info.misses == 1 and info.hits >= 1            # config and weights share one parse
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_gguf_config_and_tokenizer_match_transformers(tiny_gguf):
    for path in gguf_files(tiny_gguf):
        folder, name = os.path.dirname(path), os.path.basename(path)
        ours = gguf_loader.load_gguf_config(path).to_dict()
        ref = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
        assert ours.pop("architectures") == ["LlamaForCausalLM"]
        for d in (ours, ref):
            for k in ("_name_or_path", "architectures", "transformers_version"):
                d.pop(k, None)
        assert ours == ref, path
        tok = gguf_loader.load_gguf_tokenizer(path)
        ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        assert type(tok) is type(ref_tok)
        assert [tok.encode(t) for t in TEXTS] == [ref_tok.encode(t) for t in TEXTS]
        assert tok.all_special_tokens == ref_tok.all_special_tokens
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
            (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id)
        assert tok.chat_template == ref_tok.chat_template and len(tok) == len(ref_tok)


def test_gguf_tokenizer_cache_equals_the_built_tokenizer(tiny_gguf, monkeypatch, tmp_path):
    """The second load comes from octavo's cache (transformers' GGUF tokenizer builder is not
    called) and behaves as the tokenizer transformers builds from the file: ids, special
    tokens, decoding, chat template; a changed file is rebuilt, not served stale."""
    import shutil

    from transformers.integrations.gguf import gguf_tokenizer_mapping

    monkeypatch.setenv("OCTAVO_TOKENIZER_CACHE", "1")
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path / "cache"))
    for i, src in enumerate(gguf_files(tiny_gguf)):
        path = str(tmp_path / f"m{i}" / os.path.basename(src))
        os.makedirs(os.path.dirname(path))
        shutil.copy(src, path)
        ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        gguf_loader.load_gguf_tokenizer(path)                          # builds and saves
        with monkeypatch.context() as m:
            def no_build(*a, **k):
                raise AssertionError("the tokenizer was rebuilt from the GGUF metadata")
            m.setattr(gguf_tokenizer_mapping, "get_gguf_tokenizer", no_build)
            tok = gguf_loader.load_gguf_tokenizer(path)
        ids = [tok.encode(t) for t in TEXTS]
        assert ids == [ref.encode(t) for t in TEXTS]
        assert [tok.decode(x) for x in ids] == [ref.decode(x) for x in ids]
        assert [tok.decode(x, skip_special_tokens=True) for x in ids] == \
            [ref.decode(x, skip_special_tokens=True) for x in ids]
        assert tok.all_special_tokens == ref.all_special_tokens and len(tok) == len(ref)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
            (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
        assert tok.chat_template == ref.chat_template
        if ref.chat_template:
            msgs = [{"role": "user", "content": "Hi there"}]
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
                ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        cached = gguf_loader._tokenizer_cache(path)
        os.utime(path, ns=(1, 1))                                      # a new file version
        assert gguf_loader._tokenizer_cache(path) != cached


def test_gguf_start_never_imports_transformers_models(tiny_gguf, tmp_path):
    """Importing `transformers.models` scans every model's source files (seconds on a slow
    machine); a GGUF start with its tokenizer cached must not need it."""
    import subprocess

    env = {**os.environ, "OCTAVO_TOKENIZER_CACHE": "1", "OCTAVO_CACHE_DIR": str(tmp_path)}
    code = ("import sys; from octavo import LLM; LLM(%r, kv_cache_memory=1 << 24, "
            "dtype='float32'); print('transformers.models' in sys.modules)" % tiny_gguf)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    # the first start builds the tokenizer with transformers (and its model modules)
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"]


@pytest.mark.parametrize("fields", [
    {},
    dict(hidden_size=96, num_attention_heads=6, rope_theta=500000.0, vocab_size=77,
         tie_word_embeddings=True, pad_token_id=0, eos_token_id=5),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
         rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=None)])
def test_llama_config_equals_transformers(fields):
    from transformers import LlamaConfig
    ours = gguf_loader.llama_config(**fields)
    ref = LlamaConfig(**fields)
    assert ours.to_dict() | {"transformers_version": None} == \
        ref.to_dict() | {"transformers_version": None}
    assert ours.model_type == "llama" and ours.rope_parameters == ref.rope_parameters
    # tensor- and pipeline-parallel workers receive the config pickled
    again = pickle.loads(pickle.dumps(ours))
    assert again.to_dict() == ours.to_dict()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (17, 160)])
def test_block_dequantization_matches_the_gguf_package(qtype, shape):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    raw = quantize(x, t)
    ours = gguf_loader.dequantize_blocks(raw, int(t))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    np.testing.assert_array_equal(ours.numpy(), dequantize(raw, t))
    assert gguf_loader.dequantize_blocks(raw, int(GGMLQuantizationType.Q4_K)) is None


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (17, 160), (64, 576)])
def test_q4_block_decoding_matches_the_gguf_package(qtype, shape):
    # q4_blocks (the C++ pass where octavo._C is built) gives the torch reference's codes, d and m
    # exactly, and codes * d + m is the gguf package's dequantization
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from octavo import ops

    t = GGMLQuantizationType[qtype]
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    raw = quantize(x, t)
    raw.setflags(write=False)                       # as a slice of the file's read-only mmap
    codes, d, m = gguf_loader.q4_blocks(raw, int(t))
    ref = gguf_loader.q4_blocks_reference(raw, int(t))
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == shape
    for got, want in zip((codes, d, m), ref):
        assert torch.equal(got, want)
    w = codes.float() * d.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(w.numpy(), dequantize(raw, t))
    if ops.USING_NATIVE:
        print("octavo._C is not built: q4_blocks ran the reference itself")
    else:
        assert ops.gguf_q4_blocks(raw, int(t)) is not None


def test_truncated_gguf_says_so(tiny_gguf, tmp_path):
    data = open(tiny_gguf, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf_loader.read_header(str(cut))
    cut.write_bytes(data[:len(data) - 64])
    with pytest.raises(ValueError, match="is truncated"):
        gguf_loader.read_header(str(cut))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        gguf_loader.read_header(str(bad))
