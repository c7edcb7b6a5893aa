"""DeepSeek-V3 multi-token prediction as the proposer (method "mtp"): drafts equal a plain-PyTorch
MTP over the whole sequence with transformers' DeepSeek-V3 decoder layer, and greedy output
equals plain decoding."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from octavo import LLM, SamplingParams

from spec_util import assert_preemption_keeps_outputs, collect_drafts

from tiny_models import save_tiny_model

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08,
              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
              q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, n_group=4, topk_group=2, n_shared_experts=1,
              first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              num_nextn_predict_layers=1)
PROMPTS = ["a b c d a b c d a", "hello world, this is a longer prompt to chunk over steps"]
MTP_EXTRAS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight")


def build_target_with_mtp(path: str, own_head: bool) -> str:
    """A tiny DeepSeek-V3 whose checkpoint carries one MTP layer (index num_hidden_layers): a
    perturbed copy of its MoE layer 1, plus the MTP projections and norms."""
    save_tiny_model(path, "deepseek_v3", "DeepseekV3ForCausalLM", **CONFIG)
    file = os.path.join(path, "model.safetensors")
    w = load_file(file)
    g = torch.Generator().manual_seed(5)
    n, h = CONFIG["num_hidden_layers"], CONFIG["hidden_size"]

    def noise(t, scale=0.05):
        return t + torch.randn(t.shape, generator=g) * scale

    for name in [k for k in w if k.startswith("model.layers.1.")]:
        w[name.replace("model.layers.1.", f"model.layers.{n}.")] = noise(w[name])
    p = f"model.layers.{n}."
    w[p + "enorm.weight"] = noise(torch.ones(h), 0.2)
    w[p + "hnorm.weight"] = noise(torch.ones(h), 0.2)
    w[p + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
    w[p + "shared_head.norm.weight"] = noise(torch.ones(h), 0.2)
    if own_head:
        w[p + "shared_head.head.weight"] = noise(w["lm_head.weight"], 0.08)
        w[p + "embed_tokens.weight"] = noise(w["model.embed_tokens.weight"], 0.08)
    save_file(w, file, metadata={"format": "pt"})
    return path


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class ReferenceMTP:
    def __init__(self, path: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding)
        self.target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        cfg = AutoConfig.from_pretrained(path)
        cfg._attn_implementation = "eager"
        n = cfg.num_hidden_layers
        w = {k[len(f"model.layers.{n}."):]: t for k, t in
             load_file(os.path.join(path, "model.safetensors")).items()
             if k.startswith(f"model.layers.{n}.")}
        # the file has one tensor per expert; transformers' layer stacks them
        E = cfg.n_routed_experts
        if "mlp.experts.0.gate_proj.weight" in w:
            w["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
                [w.pop(f"mlp.experts.{e}.gate_proj.weight"),
                 w.pop(f"mlp.experts.{e}.up_proj.weight")]) for e in range(E)])
            w["mlp.experts.down_proj"] = torch.stack(
                [w.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(E)])
        self.layer = DeepseekV3DecoderLayer(cfg, n)
        missing, _ = self.layer.load_state_dict({k: t for k, t in w.items()
                                                 if not k.startswith(MTP_EXTRAS)}, strict=False)
        assert not missing, missing
        self.layer.eval()
        self.w, self.eps = w, cfg.rms_norm_eps
        self.embed = w.get("embed_tokens.weight", self.target.model.embed_tokens.weight)
        self.head = w.get("shared_head.head.weight", self.target.lm_head.weight)
        self.rotary = DeepseekV3RotaryEmbedding(cfg)

    @torch.no_grad()
    def drafts(self, ids: list[int], k: int) -> list[int]:
        feats = self.target.model(torch.tensor([ids[:-1]])).last_hidden_state[0]
        tokens, out = list(ids[1:]), []
        for _ in range(k):
            e = self.embed[torch.tensor(tokens)].clone()
            e[0] = 0                                        # position 0's embedding is masked
            x = torch.cat([_rms(e, self.w["enorm.weight"], self.eps),
                           _rms(feats, self.w["hnorm.weight"], self.eps)], -1)
            x = x @ self.w["eh_proj.weight"].T
            n = x.shape[0]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            y = self.layer(x[None], attention_mask=mask, position_ids=pos,
                           position_embeddings=self.rotary(x[None], pos))
            y = (y[0] if isinstance(y, tuple) else y)[0]
            logits = _rms(y[-1], self.w["shared_head.norm.weight"], self.eps) @ self.head.T
            d = int(logits.argmax())
            out.append(d)
            tokens.append(d)
            feats = torch.cat([feats, y[-1:]])
        return out


@pytest.mark.parametrize("own_head", [True, False])
def test_drafts_equal_the_reference(tmp_path, own_head):
    path = build_target_with_mtp(str(tmp_path / "dsv3"), own_head)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_num_batched_tokens=8,
              speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 2})
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seen = collect_drafts(llm, PROMPTS, params)
    assert len(seen) >= 4
    ref = ReferenceMTP(path)
    for ids, drafts in seen:
        assert drafts == ref.drafts(ids, len(drafts)), ids
    plain = LLM(model=path, dtype="float32", enforce_eager=True).generate(
        PROMPTS, params, use_tqdm=False)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert engine.kv.pool.num_free == engine.kv.num_blocks


def test_checkpoint_without_mtp_layers_is_refused(tiny_model_factory):
    llama = tiny_model_factory("LlamaForCausalLM")
    with pytest.raises(ValueError, match="multi-token-prediction"):
        LLM(model=llama, speculative_config={"method": "mtp", "num_speculative_tokens": 2})



def test_preemption_keeps_outputs(tmp_path):
    path = build_target_with_mtp(str(tmp_path / "dsv3"), own_head=False)
    assert_preemption_keeps_outputs(
        path, {"method": "mtp", "num_speculative_tokens": 2},
        PROMPTS + ["one two three four five six seven", "the cat the cat the"],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), dtype="float32")
