"""Checkpoint loading: single / sharded safetensors, .bin fallback, tied embeddings, dtype cast,
and errors that name the problem (missing files, truncated files, missing tensors, unknown
architectures)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from octavo.models.loader import load_weights, weight_files
from octavo.models.registry import get_model_class, supported_architectures


def _config(tie=False, arch="Qwen2ForCausalLM"):
    cls = {"Qwen2ForCausalLM": transformers.Qwen2Config,
           "LlamaForCausalLM": transformers.LlamaConfig}[arch]
    return cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
               tie_word_embeddings=tie, architectures=[arch])


def _save(tmp_path, tie=False, arch="Qwen2ForCausalLM", **kwargs):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(tie, arch), dtype=torch.float32)
    hf.save_pretrained(tmp_path, **kwargs)
    return hf


def _octavo(model_dir):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config)(config)
    load_weights(model, str(model_dir))
    return model


def _assert_same_weights(model, hf):
    sd = hf.state_dict()
    attn = model.model.layers[1].self_attn
    p = "model.layers.1.self_attn."
    torch.testing.assert_close(attn.qkv_proj.weight, torch.cat(
        [sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]]).to(
        attn.qkv_proj.weight.dtype))
    torch.testing.assert_close(attn.qkv_proj.bias, torch.cat(
        [sd[p + "q_proj.bias"], sd[p + "k_proj.bias"], sd[p + "v_proj.bias"]]).to(
        attn.qkv_proj.bias.dtype))
    mlp = model.model.layers[0].mlp
    torch.testing.assert_close(mlp.gate_up_proj.weight, torch.cat(
        [sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]]).to(
        mlp.gate_up_proj.weight.dtype))
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"].to(model.lm_head.weight.dtype))
    torch.testing.assert_close(model.model.norm.weight, sd["model.norm.weight"].to(model.model.norm.weight.dtype))


def test_single_safetensors_file(tmp_path):
    hf = _save(tmp_path)
    assert weight_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]
    _assert_same_weights(_octavo(tmp_path), hf)


def test_sharded_safetensors_index(tmp_path):
    hf = _save(tmp_path, max_shard_size="40KB")
    files = weight_files(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") and len(files) > 1
    _assert_same_weights(_octavo(tmp_path), hf)


def test_pytorch_bin_fallback(tmp_path):
    torch.manual_seed(0)
    config = _config()
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert weight_files(str(tmp_path)) == [str(tmp_path / "pytorch_model.bin")]
    _assert_same_weights(_octavo(tmp_path), hf)


def test_tied_embeddings_share_the_embedding(tmp_path):
    hf = _save(tmp_path, tie=True, arch="LlamaForCausalLM")
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = _octavo(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, hf.state_dict()["model.embed_tokens.weight"])
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(model.compute_logits(hidden), hf.lm_head(hidden))


def test_loads_into_the_default_dtype(tmp_path):
    hf = _save(tmp_path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = _octavo(tmp_path)
    finally:
        torch.set_default_dtype(previous)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32
    _assert_same_weights(model, hf)
    assert model.compute_logits(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.float32


def test_extra_checkpoint_tensors_are_ignored_with_a_warning(tmp_path, caplog):
    _save(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # skipped silently
    sd["vision_tower.proj.weight"] = torch.ones(2, 2)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="octavo.models.loader"):
        _octavo(tmp_path)
    assert "vision_tower.proj.weight" in caplog.text and "inv_freq" not in caplog.text


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weight_files(str(tmp_path / "nope"))
    _config().save_pretrained(tmp_path)  # config.json only
    with pytest.raises(FileNotFoundError, match=r"no weights found in .*model\.safetensors"):
        _octavo(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    _save(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        _octavo(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    _save(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        _octavo(tmp_path)
    path.write_bytes(b"\x05garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        _octavo(tmp_path)


def test_checkpoint_missing_parameters_lists_them(tmp_path):
    _save(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"], sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 2 parameters") as err:
        _octavo(tmp_path)
    assert "model.norm.weight" in str(err.value)
    assert "model.layers.1.self_attn.qkv_proj.weight (shards ['k'])" in str(err.value)


def test_wrong_shape_names_the_tensor(tmp_path):
    _save(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        _octavo(tmp_path)


def test_registry():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
            "Qwen3ForCausalLM"} <= set(supported_architectures())
    assert get_model_class(_config()).__name__ == "Qwen2ForCausalLM"
    config = _config()
    config.architectures = ["FancyOldLMHeadModel", "MistralForCausalLM"]
    assert get_model_class(config).__name__ == "MistralForCausalLM"
    config.architectures = ["FancyNewForCausalLM"]
    with pytest.raises(ValueError, match=r"FancyNewForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class(config)
    config.architectures = None
    with pytest.raises(ValueError, match="no `architectures`"):
        get_model_class(config)
