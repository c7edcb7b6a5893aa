"""Hugging Face parity of DeepSeek-V2 and DeepSeek-V3 (MLA over the latent cache + MoE), and the
latent cache itself: prefix caching on and off, preemption, chunked prefill, its size.

Tiny configs switch on each feature: q_lora on (V2, V3) and off (V2-Lite), V2's
group_limited_greedy softmax routing and plain greedy, V3's sigmoid routing with the
score-correction bias in groups, shared experts, dense-first layers, routed_scaling_factor,
norm_topk_prob, GPT-J (interleaved) and neox rotary, yarn with mscale / mscale_all_dim.
`test_feature_changes_transformers_output` and `test_zeroed_modules_change_transformers_output`
show that transformers' output depends on each.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from octavo import LLM, SamplingParams
from octavo.models.layers.cache_spec import PagedKVSpec, PagedLatentSpec
from octavo.models.layers.mla import MLAAttention

from parity import (PROMPTS, assert_matches_hf, assert_two_ranks_match_one,
                    assert_zeroing_changes_logits, parity_tests, tiny_model_dirs)

MLA = dict(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=12)
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08,
              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, **MLA)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
        "mscale_all_dim": 0.8, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1}

# case -> (architecture, model_type, config fields)
CASES = {
    # top-3 within the best 2 of 4 groups of 2 experts (each scored by its best expert: with
    # top_k <= topk_group the groups could not matter); layer 0 dense; weights scaled
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2", dict(
        topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5)),
    # V2-Lite: no q_lora (a plain q_proj), plain greedy top-k, two shared experts, no dense layer
    "deepseek_v2-lite": ("DeepseekV2ForCausalLM", "deepseek_v2", dict(
        q_lora_rank=None, topk_method="greedy", n_shared_experts=2, first_k_dense_replace=0)),
    # sigmoid + bias in groups (two best per group), renormalised, scaled; interleaved rope
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)),
    # yarn with mscale (rotary cache and softmax scale), neox rope, no groups, no renorm
    "deepseek_v3-yarn": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=2,
        norm_topk_prob=False, rope_interleave=False, rope_parameters=YARN)),
}
ARCHITECTURES = sorted({arch for arch, _, _ in CASES.values()})  # read by test_registry.py

FEATURES = {
    "deepseek_v2": [dict(topk_method="greedy"), dict(routed_scaling_factor=1.0)],
    "deepseek_v3": [dict(n_group=1, topk_group=1), dict(norm_topk_prob=False),
                    dict(routed_scaling_factor=1.0), dict(rope_interleave=False)],
    "deepseek_v3-yarn": [dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                         dict(rope_parameters={**YARN, "mscale_all_dim": 0.0})],
}
ZEROED = {
    "deepseek_v2": [("shared_experts.down_proj", "the shared experts"),
                    ("layers.0.mlp.down_proj", "the dense first layer's MLP")],
    "deepseek_v3": [("shared_experts.down_proj", "the shared experts"),
                    ("e_score_correction_bias", "the score-correction bias")],
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return tiny_model_dirs(tmp_path_factory, CASES, COMMON, biases=True)


test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output = \
    parity_tests(CASES, FEATURES)


@pytest.mark.parametrize("case", list(ZEROED))
def test_zeroed_modules_change_transformers_output(case, model_dirs):
    assert_zeroing_changes_logits(model_dirs(case), ZEROED[case], case)


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2-lite"])
def test_decompressed_prefill_matches_transformers(case, model_dirs, monkeypatch):
    """Prompts attended with decompressed K/V (as long prompts are), decode over the latents the
    prefill cached."""
    from octavo.models.layers.mla import MultiHeadLatentAttention

    calls = []
    original = MultiHeadLatentAttention._prefill_decompressed

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(MultiHeadLatentAttention, "decompress_min_tokens", 2)
    monkeypatch.setattr(MultiHeadLatentAttention, "_prefill_decompressed", spy)
    assert_matches_hf(model_dirs(case), block_size=16)
    assert calls, "no step took the decompressed prefill"


def test_mtp_layers_in_the_checkpoint_are_skipped(model_dirs, tmp_path):
    """DeepSeek-V3 checkpoints carry num_nextn_predict_layers MTP layers after the last decoder
    layer (model.layers.<num_hidden_layers>.*: enorm, hnorm, eh_proj, a whole decoder layer);
    they load as ignored tensors and change nothing."""
    from tp_util import one_rank_logits

    src = model_dirs("deepseek_v3")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    n, hidden = COMMON["num_hidden_layers"], COMMON["hidden_size"]
    extra = {f"model.layers.{n}.{k[len('model.layers.2.'):]}": v.clone()
             for k, v in tensors.items() if k.startswith("model.layers.2.")}
    extra.update({f"model.layers.{n}.enorm.weight": torch.ones(hidden),
                  f"model.layers.{n}.hnorm.weight": torch.ones(hidden),
                  f"model.layers.{n}.eh_proj.weight": torch.zeros(hidden, 2 * hidden)})
    dst = tmp_path / "with_mtp"
    dst.mkdir()
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src):
        if name != "model.safetensors":
            (dst / name).write_bytes(open(os.path.join(src, name), "rb").read())
    seqs = [list(range(3, 16)), list(range(40, 61))]
    torch.testing.assert_close(one_rank_logits(str(dst), seqs), one_rank_logits(src, seqs),
                               atol=0, rtol=0)


# ---- the latent cache in the engine --------------------------------------------------------

def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(model_dirs):
    """deepseek_v3's greedy tokens of each prompt run by itself, no prefix caching."""
    llm = LLM(model=model_dirs("deepseek_v3"), dtype="float32", kv_cache_memory=1 << 22,
              enable_prefix_caching=False)
    return [_tokens(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_prefix_caching_on_and_off(model_dirs):
    shared = "The capital of France is Paris. The capital of Italy is Rome. " * 3
    prompts = [shared + p for p in PROMPTS[:4]]
    kw = dict(model=model_dirs("deepseek_v3"), dtype="float32", kv_cache_memory=1 << 22)
    off = LLM(enable_prefix_caching=False, **kw)
    on = LLM(enable_prefix_caching=True, block_size=4, **kw)
    expected = [_tokens(off.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]
    first = on.generate(prompts, GREEDY, use_tqdm=False)
    second = on.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(first) == expected and _tokens(second) == expected
    assert all(o.num_cached_tokens > 0 for o in second)
    assert on.llm_engine.kv.prefix_hits > 0


def test_preemption_keeps_outputs(model_dirs, alone):
    kw = dict(model=model_dirs("deepseek_v3"), dtype="float32", block_size=4, max_model_len=96,
              max_num_seqs=len(PROMPTS), enable_prefix_caching=False)
    per_block = LLM(kv_cache_memory=1 << 22, **kw).llm_engine.runner.bytes_per_block()
    small = LLM(kv_cache_memory=28 * per_block, **kw)   # 28 blocks of 4 tokens for 9 prompts
    assert small.llm_engine.kv.num_blocks == 28
    out = small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert _tokens(out) == alone


def test_chunked_prefill_matches(model_dirs, alone):
    chunked = LLM(model=model_dirs("deepseek_v3"), dtype="float32", kv_cache_memory=1 << 22,
                  max_num_batched_tokens=7, max_model_len=256, enable_prefix_caching=False)
    assert _tokens(chunked.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone


def test_latent_cache_size(model_dirs):
    """Each layer allocates one [num_blocks, block_size, kv_lora_rank + rope] tensor: per token
    and layer L+R values, where a decompressed K/V cache would hold 2 x heads x head size."""
    budget = 1 << 22
    llm = LLM(model=model_dirs("deepseek_v3"), dtype="float32", kv_cache_memory=budget,
              block_size=16)
    runner = llm.llm_engine.runner
    layers = [m for m in runner.cache_layers]
    assert len(layers) == COMMON["num_hidden_layers"]
    assert all(isinstance(m, MLAAttention) for m in layers)
    latent = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
    per_token = COMMON["num_hidden_layers"] * latent * 4               # fp32
    assert runner.bytes_per_block() == 16 * per_token
    num_blocks = budget // (16 * per_token)
    assert llm.llm_engine.kv.num_blocks == num_blocks
    allocated = sum(t.numel() * t.element_size() for m in layers for t in [m.kv_cache])
    assert allocated == num_blocks * 16 * per_token
    assert all(tuple(m.kv_cache.shape) == (num_blocks, 16, latent) for m in layers)
    # the old layout: K = [k_nope | k_rope] and V padded to it, per head
    head = max(MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"], MLA["v_head_dim"])
    heads = COMMON["num_attention_heads"]
    old = PagedKVSpec(heads, head).page_bytes(16, torch.float32) * COMMON["num_hidden_layers"]
    assert old / runner.bytes_per_block() == 2 * heads * head / latent     # 192 / 32 = 6x here


def test_deepseek_v3_shapes_cache_576_values_per_token():
    """DeepSeek-V3's real attention shapes (built on the meta device): 512 + 64 = 576 values per
    token and layer instead of 2 x 128 heads x 192, a 85.3x smaller cache."""
    from transformers import DeepseekV3Config

    from octavo.models.layers.mla import MultiHeadLatentAttention

    config = DeepseekV3Config()
    with torch.device("meta"):
        attn = MultiHeadLatentAttention(config, rope_neox=False)
    spec = attn.attn.cache_spec()
    assert spec == PagedLatentSpec(576)
    latent = spec.page_bytes(1, torch.bfloat16)
    decompressed = PagedKVSpec(128, 192).page_bytes(1, torch.bfloat16)
    assert (latent, decompressed) == (576 * 2, 2 * 128 * 192 * 2)
    assert decompressed / latent == pytest.approx(85.33, abs=0.01)


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    """Heads split across ranks (q_b_proj / q_proj and kv_b_proj by column, so each rank absorbs
    its own heads' W_UK / W_UV; o_proj by row), experts' intermediate size split."""
    assert_two_ranks_match_one({case: model_dirs(case) for case in
                                ["deepseek_v2", "deepseek_v2-lite", "deepseek_v3"]}, tmp_path)


def test_fp8_kv_cache_is_refused_for_the_latent_cache(model_dirs):
    # MLA's latent cache is not quantized: kv_cache_dtype="fp8" says so instead of running
    with pytest.raises(ValueError, match="latent cache octavo does not quantize"):
        LLM(model_dirs("deepseek_v3"), kv_cache_dtype="fp8", kv_cache_memory=1 << 22)
