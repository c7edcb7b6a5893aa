"""Hugging Face parity of InternLM (v1, remote code: InternLMForCausalLM).

InternLM is Llama with multi-head attention (its config has no kv-head field), biases on
q/k/v/o when `bias` is set, and the rotary base in a `rotary` dict ({"base", "type"}). Its tensor
names are Llama's, so the reference is transformers' Llama with attention_bias and the same
rope_theta, saved as is; the remote directory gets InternLM's config.json (auto_map to a minimal
configuration class, as the real checkpoints load). `test_features_change_reference_output`
shows the biases and the rotary base matter.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import save_tiny_model
from parity import (assert_changes_logits, assert_matches_hf, assert_two_ranks_match_one, logits,
                    longest_prompt_ids, per_case, randomise_norms)
from test_parity_remote import COMMON, HEADS, LLAMA_FIELDS, write_remote

ARCHITECTURES = ["InternLMForCausalLM"]

# name -> (InternLM config fields, reference Llama fields)
CASES = {
    "internlm": (dict(bias=True, rotary={"base": 20000, "type": "dynamic"}),
                 dict(attention_bias=True, rope_theta=20000.0)),
    # the first internlm-7b config: no rotary dict (base 10000), and here no biases
    "internlm-no-bias": (dict(bias=False), dict(attention_bias=False, rope_theta=10000.0)),
}


def randomise_biases(tensors: dict, seed: int) -> None:
    """transformers initialises biases to zero, which would hide a misplaced one."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = 0.1 * torch.randn(t.shape, generator=gen)


def build_case(name: str, root: str) -> tuple[str, str]:
    fields, ref_fields = CASES[name]
    ref_dir, remote = os.path.join(root, "reference"), os.path.join(root, name)
    save_tiny_model(ref_dir, "llama", "LlamaForCausalLM",
                    **{**COMMON, "num_key_value_heads": HEADS, **ref_fields})
    file = os.path.join(ref_dir, "model.safetensors")
    tensors = load_file(file)
    randomise_norms(tensors, seed=1)
    randomise_biases(tensors, seed=2)
    save_file(tensors, file, metadata={"format": "pt"})
    config = {k: COMMON[k] for k in LLAMA_FIELDS if k in COMMON and k != "num_key_value_heads"}
    config.update(fields, vocab_size=AutoConfig.from_pretrained(ref_dir).vocab_size,
                  architectures=["InternLMForCausalLM"], model_type="internlm",
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})
    write_remote(remote, ref_dir, tensors, config)  # Llama's tensor names, as is
    return ref_dir, remote


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    return per_case(tmp_path_factory, build_case)


def _reference(ref_dir: str, zero_biases: bool = False, **changes):
    config = AutoConfig.from_pretrained(ref_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(ref_dir, config=config, dtype=torch.float32)
    if zero_biases:
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.data.zero_()
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_and_logprobs_match_transformers(name, case_dirs):
    ref_dir, remote = case_dirs(name)
    assert_matches_hf(remote, reference=_reference(ref_dir), trust_remote_code=True,
                      block_size=16)


@pytest.mark.parametrize("what", ["bias", "rotary base"])
def test_features_change_reference_output(what, case_dirs):
    ids = longest_prompt_ids()
    ref_dir, _ = case_dirs("internlm")
    changed = (_reference(ref_dir, zero_biases=True) if what == "bias" else
               _reference(ref_dir, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    assert_changes_logits(logits(_reference(ref_dir), ids), logits(changed, ids), what)


def test_unknown_rotary_type_is_refused():
    from transformers import PretrainedConfig

    from octavo.models.internlm import InternLMForCausalLM
    config = PretrainedConfig(**{**{k: COMMON[k] for k in LLAMA_FIELDS if k in COMMON},
                                 "vocab_size": 64, "rotary": {"base": 10000, "type": "yarn"}})
    with pytest.raises(ValueError, match="rotary type 'yarn'"):
        InternLMForCausalLM(config)


def test_tensor_parallel_two_ranks_match_one(case_dirs, tmp_path):
    """Per-head q/k/v biases split with their heads; o_proj's bias added once after the reduce."""
    assert_two_ranks_match_one({"internlm": case_dirs("internlm")[1]}, tmp_path)
