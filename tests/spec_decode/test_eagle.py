"""EAGLE-1 heads: the drafts octavo's proposer makes (paged head cache, features collected over
prompt chunks and verification steps) equal a plain-PyTorch EAGLE run over the whole sequence
with transformers' Llama layer, and greedy output equals plain decoding."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from octavo import LLM, SamplingParams

from spec_util import assert_preemption_keeps_outputs, collect_drafts

PROMPTS = ["a b c d a b c d a", "hello world, this is a longer prompt to chunk over steps"]


def build_head(path: str, target_dir: str, own_embedding: bool, seed: int = 0) -> str:
    """A random EAGLE-1 head in the EAGLE repository's layout, for the target in target_dir."""
    from transformers import LlamaConfig
    cfg = json.load(open(os.path.join(target_dir, "config.json")))
    head_cfg = LlamaConfig(**{k: cfg[k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps", "vocab_size")}, num_hidden_layers=1,
        architectures=["LlamaForCausalLM"])
    os.makedirs(path, exist_ok=True)
    head_cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    h, i, v = head_cfg.hidden_size, head_cfg.intermediate_size, head_cfg.vocab_size
    hd = h // head_cfg.num_attention_heads
    kv = head_cfg.num_key_value_heads * hd

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.08

    w = {"fc.weight": rnd(h, 2 * h),
         "layers.0.self_attn.q_proj.weight": rnd(h, h),
         "layers.0.self_attn.k_proj.weight": rnd(kv, h),
         "layers.0.self_attn.v_proj.weight": rnd(kv, h),
         "layers.0.self_attn.o_proj.weight": rnd(h, h),
         "layers.0.mlp.gate_proj.weight": rnd(i, h),
         "layers.0.mlp.up_proj.weight": rnd(i, h),
         "layers.0.mlp.down_proj.weight": rnd(h, i),
         "layers.0.post_attention_layernorm.weight": 1 + rnd(h)}
    if own_embedding:
        w["embed_tokens.weight"] = rnd(v, h)
    save_file(w, os.path.join(path, "model.safetensors"))
    return path


class ReferenceEagle:
    """EAGLE-1 by its definition, with transformers' modules and no cache: position j reads
    token j + 1 and the target's final hidden state at j; drafted positions read the head's own
    output as the feature."""

    def __init__(self, target_dir: str, head_dir: str) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer,
                                                              LlamaRotaryEmbedding)
        self.target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
        cfg = LlamaConfig.from_pretrained(head_dir)
        cfg._attn_implementation = "eager"
        w = load_file(os.path.join(head_dir, "model.safetensors"))
        self.layer = LlamaDecoderLayer(cfg, 0)
        self.layer.load_state_dict({k[len("layers.0."):]: t for k, t in w.items()
                                    if k.startswith("layers.0.")}, strict=False)
        self.layer.input_layernorm = torch.nn.Identity()
        self.fc = w["fc.weight"]
        self.embed = w.get("embed_tokens.weight", self.target.model.embed_tokens.weight)
        self.rotary = LlamaRotaryEmbedding(cfg)

    @torch.no_grad()
    def drafts(self, ids: list[int], k: int) -> list[int]:
        feats = self.target.model(torch.tensor([ids[:-1]])).last_hidden_state[0]
        tokens, out = list(ids[1:]), []
        for _ in range(k):
            x = torch.cat([self.embed[torch.tensor(tokens)], feats], -1) @ self.fc.T
            n = x.shape[0]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            g = self.layer(x[None], attention_mask=mask, position_ids=pos,
                           position_embeddings=self.rotary(x[None], pos))
            g = (g[0] if isinstance(g, tuple) else g)[0]
            d = int(self.target.lm_head(g[-1]).argmax())
            out.append(d)
            tokens.append(d)
            feats = torch.cat([feats, g[-1:]])
        return out


@pytest.mark.parametrize("own_embedding", [True, False])
def test_drafts_equal_the_reference(llama_dir, tmp_path, own_embedding):
    head = build_head(str(tmp_path / "head"), llama_dir, own_embedding)
    k = 3
    llm = LLM(model=llama_dir, dtype="float32", enforce_eager=True, max_num_batched_tokens=8,
              speculative_config={"method": "eagle", "model": head, "num_speculative_tokens": k})
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seen = collect_drafts(llm, PROMPTS, params)
    assert len(seen) >= 4
    ref = ReferenceEagle(llama_dir, head)
    for ids, drafts in seen:
        assert drafts == ref.drafts(ids, len(drafts)), ids


def test_greedy_equals_plain_decoding(llama_dir, tmp_path):
    head = build_head(str(tmp_path / "head"), llama_dir, own_embedding=False, seed=1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(model=llama_dir, enforce_eager=True).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model=llama_dir, enforce_eager=True, max_num_batched_tokens=8, block_size=4,
              speculative_config={"method": "eagle", "model": head, "num_speculative_tokens": 2})
    for _ in range(2):                      # the second time over prefix-cache hits
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    engine = llm.llm_engine
    assert engine.spec.stats.num_draft_tokens > 0
    assert engine.kv.pool.num_free == engine.kv.num_blocks


def test_head_for_another_width_is_refused(llama_dir, tiny_model_factory, tmp_path):
    wide = tiny_model_factory("LlamaForCausalLM", hidden_size=96, intermediate_size=128)
    head = build_head(str(tmp_path / "head"), wide, own_embedding=True)
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(model=llama_dir, speculative_config={"method": "eagle", "model": head,
                                                 "num_speculative_tokens": 2})



def test_preemption_keeps_outputs(llama_dir, tmp_path):
    head = build_head(str(tmp_path / "head"), llama_dir, own_embedding=True, seed=2)
    assert_preemption_keeps_outputs(
        llama_dir, {"method": "eagle", "model": head, "num_speculative_tokens": 3},
        PROMPTS + ["one two three four five six seven", "the cat the cat the"],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
