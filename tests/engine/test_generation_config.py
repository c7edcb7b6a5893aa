"""generation_config: "auto" takes default sampling values and EOS ids from the model's
generation_config.json (as vLLM does), "octavo" ignores it, a directory points at another."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from octavo import LLM, SamplingParams

KV = 1 << 24


def write_generation_config(path, **values):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(values, f)
    return str(path)


@pytest.fixture
def model_copy(llama_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(llama_dir, path)
    return str(path)


def test_defaults_from_generation_config(model_copy):
    write_generation_config(model_copy, temperature=0.6, top_p=0.9, top_k=20, min_p=0.05,
                            repetition_penalty=1.1, max_new_tokens=7, do_sample=True,
                            eos_token_id=[2, 5], bos_token_id=1)
    params = LLM(model_copy, kv_cache_memory=KV).get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.9, 20, 0.05)
    assert (params.repetition_penalty, params.max_tokens) == (1.1, 7)
    llm = LLM(model_copy, kv_cache_memory=KV, generation_config="octavo")
    plain = SamplingParams()
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
        plain.temperature, plain.top_p, plain.top_k, plain.max_tokens)
    assert 5 not in llm.llm_engine.eos_token_ids


def test_generate_without_params_uses_them(model_copy):
    # top_k=1 makes sampling greedy, so the defaults' effect is checkable exactly.
    write_generation_config(model_copy, top_k=1, max_new_tokens=5)
    llm = LLM(model_copy, kv_cache_memory=KV)
    prompt = "Once upon a time"
    got = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5),
                          use_tqdm=False)[0].outputs[0]
    assert got.token_ids == greedy.token_ids
    assert len(got.token_ids) == 5 or got.finish_reason == "stop"


def test_eos_ids_from_another_directory(model_copy, tmp_path):
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=10)
    plain = LLM(model_copy, kv_cache_memory=KV, generation_config="octavo")
    tokens = plain.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(tokens) == 10                      # no EOS in the first 10 greedy tokens
    stop_at = tokens[2]
    first = tokens.index(stop_at)
    gen_dir = write_generation_config(tmp_path / "gen", eos_token_id=[2, stop_at])
    llm = LLM(model_copy, kv_cache_memory=KV, generation_config=gen_dir)
    out = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    with pytest.raises(ValueError, match="generation_config"):
        LLM(model_copy, generation_config=str(tmp_path / "missing"))
