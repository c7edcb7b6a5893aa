"""Cold start stays off transformers' slow import chain: `LLM(model)` on a Llama directory (and
on a GGUF file with its tokenizer cached) must not import the modules a config does not need,
and the config and tokenizer octavo builds without them (octavo.hf_config) must equal what
AutoConfig and AutoTokenizer build."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from octavo import hf_config
from octavo.hf_config import load_hf_config, load_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from gguf_util import write_llama_gguf  # noqa: E402

# Imported by transformers' configuration_llama (type validators -> activations -> hub
# kernels -> core_model_loading -> torch.distributed.tensor, FSDP, accelerate, sympy) and by
# AutoConfig / AutoTokenizer (`transformers.models` scans every model's source files).
SLOW_MODULES = ("transformers.models", "transformers.activations", "transformers.core_model_loading",
                "torch.distributed.tensor", "accelerate", "sympy")
TEXTS = ["Hello, my name is", "The capital of France is Paris.", " leading space",
         "ünïcödé and 你好 and emoji 🙂", "tabs\tand\nnew lines  ", ""]


def _loaded_slow_modules(code: str, env: dict | None = None) -> list[str]:
    probe = (f"{code}\nimport sys\n"
             f"print('SLOW', [m for m in {SLOW_MODULES!r} if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("SLOW ")][-1]
    return eval(line[len("SLOW "):])


def test_llama_start_skips_the_slow_imports(llama_dir):
    code = ("from octavo import LLM, SamplingParams\n"
            f"llm = LLM({llama_dir!r}, kv_cache_memory=1 << 24, dtype='float32')\n"
            "out = llm.generate('Hello', SamplingParams(temperature=0, max_tokens=2), "
            "use_tqdm=False)\n"
            "assert len(out[0].outputs[0].token_ids) == 2")
    assert _loaded_slow_modules(code) == []


def test_gguf_start_with_cached_tokenizer_skips_the_slow_imports(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models import TINY_COMMON
    from tokenizer_util import make_tokenizer

    tok = make_tokenizer()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"],
                                  **{**TINY_COMMON, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    os.makedirs(tmp_path / "alone")
    path = write_llama_gguf(str(tmp_path / "hf"), str(tmp_path / "alone" / "tiny.gguf"))
    env = {**os.environ, "OCTAVO_TOKENIZER_CACHE": "1", "OCTAVO_CACHE_DIR": str(tmp_path)}
    code = f"from octavo import LLM\nLLM({path!r}, kv_cache_memory=1 << 24, dtype='float32')"
    _loaded_slow_modules(code, env)                  # builds the tokenizer cache
    assert _loaded_slow_modules(code, env) == []


def test_other_models_still_go_through_autoconfig(tiny_model_factory):
    path = tiny_model_factory("Qwen2ForCausalLM")
    ours, ref = load_hf_config(path), AutoConfig.from_pretrained(path)
    assert type(ours) is type(ref) and ours.to_dict() == ref.to_dict()
    tok = load_tokenizer(path, hf_config=ours)
    assert type(tok) is type(AutoTokenizer.from_pretrained(path))


def test_llama_mirror_declares_transformers_fields():
    """Same field names, defaults and class attributes as transformers' LlamaConfig, so a new
    transformers release that changes LlamaConfig fails here."""
    ours = hf_config.LlamaConfig

    def described(cls):
        return [(f.name, f.default, f.default_factory) for f in dataclasses.fields(cls)]

    assert described(ours) == described(LlamaConfig)
    for attr in ("model_type", "base_model_tp_plan", "base_model_pp_plan", "attribute_map",
                 "sub_configs_defaults", "default_theta"):
        assert getattr(ours, attr, None) == getattr(LlamaConfig, attr, None), attr
    assert ours.__name__ == "LlamaConfig"         # transformers' auto mappings look it up by name


# config.json files as found on the Hub and as save_pretrained writes them
_HUB_STYLE = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                  intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000, rope_scaling=None,
                  torch_dtype="bfloat16", transformers_version="4.42.3", vocab_size=49152,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  max_position_embeddings=8192, hidden_act="silu", initializer_range=0.02,
                  pretraining_tp=1, use_cache=True, attention_bias=False, attention_dropout=0.0,
                  mlp_bias=False)
_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192, rope_type="llama3")
CONFIGS = {
    "minimal": dict(model_type="llama"),
    "hub_style": _HUB_STYLE,
    "llama3_rope_scaling": {**_HUB_STYLE, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
                            "max_position_embeddings": 131072, "eos_token_id": [128001, 128008]},
    "linear_rope_v5": dict(model_type="llama", rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=20000.0)),
    "yarn_rope": dict(model_type="llama", max_position_embeddings=4096, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)),
    "head_dim_gqa_dtype": dict(model_type="llama", hidden_size=256, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=128, dtype="float16",
                               generation_field_max_length=7, max_length=50,
                               unknown_extra_key={"kept": True}, use_cache=False),
}


def _write(tmp_path, name, fields):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_config_equals_autoconfig(tmp_path, name):
    path = _write(tmp_path, name, CONFIGS[name])
    ours, ref = load_hf_config(path), AutoConfig.from_pretrained(path)
    assert isinstance(ours, hf_config.LlamaConfig)
    assert ours.to_dict() == ref.to_dict()
    assert ours.to_diff_dict() == ref.to_diff_dict()     # defaults agree too
    assert vars(ours) == vars(ref)
    assert ours.rope_parameters == ref.rope_parameters and ours.dtype == ref.dtype


def test_saved_llama_config_equals_autoconfig(tmp_path):
    ref_in = LlamaConfig(hidden_size=96, num_attention_heads=6, vocab_size=77, pad_token_id=0,
                         rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4))
    ref_in.save_pretrained(tmp_path)
    ours, ref = load_hf_config(str(tmp_path)), AutoConfig.from_pretrained(str(tmp_path))
    assert ours.to_dict() == ref.to_dict() and vars(ours) == vars(ref)


@pytest.mark.parametrize("fields, match", [
    (dict(model_type="llama", hidden_size=100, num_attention_heads=3), "multiple"),
    (dict(model_type="llama", initializer_range=2.0), "initializer_range|0.0, 1.0"),
    (dict(model_type="llama", vocab_size="many"), "vocab_size"),
])
def test_bad_llama_config_fails_as_transformers_does(tmp_path, fields, match):
    path = _write(tmp_path, "bad", fields)
    with pytest.raises(Exception) as ref_error:
        AutoConfig.from_pretrained(path)
    with pytest.raises(type(ref_error.value), match=match):
        load_hf_config(path)


def test_llama_tokenizer_equals_autotokenizer(chat_model_dir):
    config = load_hf_config(chat_model_dir)
    tok = load_tokenizer(chat_model_dir, hf_config=config)
    ref = AutoTokenizer.from_pretrained(chat_model_dir)
    assert type(tok) is type(ref)
    ids = [tok.encode(t) for t in TEXTS]
    assert ids == [ref.encode(t) for t in TEXTS]
    assert [tok.decode(x, skip_special_tokens=True) for x in ids] == \
        [ref.decode(x, skip_special_tokens=True) for x in ids]
    assert tok.all_special_tokens == ref.all_special_tokens and len(tok) == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_llama_config_pickles(llama_dir):
    """The multiprocess executor sends the engine config (with this config) to its workers."""
    import pickle

    ours = load_hf_config(llama_dir)
    back = pickle.loads(pickle.dumps(ours))
    assert type(back) is hf_config.LlamaConfig and back.to_dict() == ours.to_dict()


def test_bench_startup_times_the_first_token(llama_dir):
    import argparse

    from octavo.bench import startup

    parser = argparse.ArgumentParser()
    startup.add_args(parser)
    rows = startup.run(parser.parse_args(["--model", llama_dir, "--runs", "1",
                                          "--cases", "torch,first"]))
    by_case = {r["case"]: r for r in rows}
    first = by_case["first"]
    assert first["median_s"] > by_case["torch"]["median_s"] > 0
    # The token is there after LLM() was called and before the process has exited.
    assert 0 < first["llm_to_token_runs_s"][0] < first["to_token_runs_s"][0] < first["runs_s"][0]
