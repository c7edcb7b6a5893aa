"""Hugging Face parity of the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
Granite MoE, Granite MoE Shared, PhiMoE, DBRX, ERNIE 4.5 MoE and GLM-4.5) on tiny random
configs: mostly 8 experts, top-2, 3 layers.

The configs switch each family's features on (shared experts with their gate, dense layers by
mlp_only_layers / decoder_sparse_step / first_k_dense_replace, grouped sigmoid routing with a
score-correction bias, norm_topk_prob on and off, clip_qkv, sliding windows,
Granite's multipliers). `test_feature_changes_transformers_output` shows that each config switch
changes transformers' logits, `test_routing_uses_many_experts` that the random routers really
spread the tokens over the experts (a router that sends everything to one expert would hide a
wrong expert order). Two tensor-parallel ranks (the experts' intermediate size split) must give
one rank's logits, and transformers 5's stacked expert layout must load like the per-expert one.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from octavo.models.layers.fused_moe import FusedMoE
from octavo.models.loader import load_weights
from octavo.models.registry import get_model_class

from parity import (assert_changes_logits, assert_refuses_tensor_parallelism,
                    assert_two_ranks_match_one, assert_zeroing_changes_logits, hf_logits, logits,
                    longest_prompt_ids, parity_tests, tiny_model_dirs)

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08,
              num_experts_per_tok=2)
# DBRX has its own field names (and no tied embeddings)
DBRX = dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, initializer_range=0.08)
QWEN_MOE = dict(num_experts=8, moe_intermediate_size=48, norm_topk_prob=False)

# case -> (architecture, model_type, config fields)
CASES = {
    "mixtral": ("MixtralForCausalLM", "mixtral", dict(num_local_experts=8)),
    "mixtral-sliding-top3": ("MixtralForCausalLM", "mixtral",
                             dict(num_local_experts=6, num_experts_per_tok=3, sliding_window=8)),
    # a shared expert with its sigmoid gate; layer 1 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe",
                  dict(QWEN_MOE, shared_expert_intermediate_size=80, mlp_only_layers=[1])),
    # experts on every second layer only; renormalised top-k
    "qwen2_moe-sparse-step": ("Qwen2MoeForCausalLM", "qwen2_moe",
                              dict(QWEN_MOE, shared_expert_intermediate_size=80,
                                   decoder_sparse_step=2, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe",
                  dict(QWEN_MOE, norm_topk_prob=True, mlp_only_layers=[0])),
    "olmoe": ("OlmoeForCausalLM", "olmoe", dict(num_experts=8, clip_qkv=0.6, norm_topk_prob=False)),
    "granitemoe": ("GraniteMoeForCausalLM", "granitemoe", dict(
        num_local_experts=8, embedding_multiplier=4.0, attention_multiplier=0.5,
        residual_multiplier=0.5, logits_scaling=2.0)),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "granitemoeshared", dict(
        num_local_experts=8, shared_intermediate_size=80, embedding_multiplier=4.0,
        attention_multiplier=0.5, residual_multiplier=0.5, logits_scaling=2.0)),
    # a wide SparseMixer margin, so that the masked softmax differs from a plain one
    "phimoe": ("PhimoeForCausalLM", "phimoe", dict(
        num_local_experts=8, router_jitter_noise=0.3, attention_bias=True, lm_head_bias=True,
        sliding_window=8)),
    # LongRoPE as transformers' PhiMoE applies it: short factors always, times short_mscale
    "phimoe-longrope": ("PhimoeForCausalLM", "phimoe", dict(
        num_local_experts=4, original_max_position_embeddings=40,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.25 * i for i in range(8)],
                         "long_factor": [2.0 + 1.5 * i for i in range(8)],
                         "short_mscale": 1.1, "long_mscale": 1.1,
                         "original_max_position_embeddings": 40})),
    # fused Wqkv clamped, one tensor per projection for all experts, L1-normalised top-k
    "dbrx": ("DbrxForCausalLM", "dbrx", dict(
        DBRX, attn_config=dict(kv_n_heads=2, clip_qkv=0.3, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=8, moe_top_k=2))),
    # top-k weights divided by their L2 norm (transformers 5.24's DBRX fails without clip_qkv)
    "dbrx-l2": ("DbrxForCausalLM", "dbrx", dict(
        DBRX, attn_config=dict(kv_n_heads=4, clip_qkv=8.0, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=6, moe_top_k=3,
                        moe_normalize_expert_weights=2.0))),
    # experts from layer 1 on (layer 0 dense), a shared expert, the score-correction bias
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", dict(
        moe_num_experts=8, moe_intermediate_size=48, moe_num_shared_experts=1,
        moe_layer_start_index=1, use_bias=False)),
    # use_bias: q/k/v/o, dense-MLP, shared-expert and lm_head biases; experts every 2nd layer
    "ernie4_5_moe-bias": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", dict(
        moe_num_experts=8, moe_intermediate_size=48, moe_num_shared_experts=2,
        moe_layer_start_index=0, moe_layer_interval=2, use_bias=True)),
    # sigmoid router, 4 groups of 2 (the best 2 groups kept), bias, scaling; layer 0 dense
    "glm4_moe": ("Glm4MoeForCausalLM", "glm4_moe", dict(
        n_routed_experts=8, moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
        attention_bias=True)),
    # one group, unnormalised weights, no dense layer, no q/k norm
    "glm4_moe-flat": ("Glm4MoeForCausalLM", "glm4_moe", dict(
        n_routed_experts=8, moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=0,
        n_group=1, topk_group=1, norm_topk_prob=False)),
}
ARCHITECTURES = sorted({arch for arch, _, _ in CASES.values()})  # read by test_registry.py

# case -> config changes, each of which switches off one feature the parity test relies on
FEATURES = {
    "mixtral-sliding-top3": [dict(sliding_window=None), dict(num_experts_per_tok=2)],
    "qwen2_moe": [dict(norm_topk_prob=True)],
    "qwen2_moe-sparse-step": [dict(norm_topk_prob=False)],
    "qwen3_moe": [dict(norm_topk_prob=False)],
    "olmoe": [dict(clip_qkv=None), dict(norm_topk_prob=True)],
    "granitemoe": [dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0)],
    "glm4_moe": [dict(n_group=1, topk_group=1), dict(routed_scaling_factor=1.0),
                 dict(norm_topk_prob=False)],
    "glm4_moe-flat": [dict(norm_topk_prob=True)],
    "ernie4_5_moe-bias": [dict(use_bias=False)],
    "phimoe": [dict(router_jitter_noise=0.01), dict(lm_head_bias=False), dict(sliding_window=None)],
    "phimoe-longrope": [dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})],
}
# case -> (tensor name part, what it is): zeroing those tensors in transformers changes the
# logits, so what they belong to is not a no-op octavo could skip
ZEROED = {
    "qwen2_moe": [("shared_expert.down_proj", "the shared expert"),
                  ("shared_expert_gate", "the shared expert's sigmoid gate")],
    "granitemoeshared": [("shared_mlp.output_linear", "the shared MLP")],
    "ernie4_5_moe": [("shared_experts.down_proj", "the shared experts"),
                     ("e_score_correction_bias", "the score-correction bias")],
    "glm4_moe": [("shared_experts.down_proj", "the shared experts"),
                 ("e_score_correction_bias", "the score-correction bias")],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    # norms and biases randomised; DBRX's config names its fields itself and takes none of COMMON
    return tiny_model_dirs(tmp_path_factory, CASES, COMMON, biases=True, bare=("dbrx",))


test_greedy_and_logprobs_match_transformers, test_feature_changes_transformers_output = \
    parity_tests(CASES, FEATURES)


@pytest.mark.parametrize("case", list(ZEROED))
def test_zeroed_modules_change_transformers_output(case, model_dirs):
    assert_zeroing_changes_logits(model_dirs(case), ZEROED[case], case)


@pytest.mark.parametrize("case, sub, changes", [
    ("dbrx", "attn_config", dict(clip_qkv=1e6)),  # no clip (None fails in transformers 5.24)
    ("dbrx", "ffn_config", dict(moe_normalize_expert_weights=None)),
    ("dbrx-l2", "ffn_config", dict(moe_normalize_expert_weights=1.0))])
def test_dbrx_feature_changes_transformers_output(case, sub, changes, model_dirs):
    ids = longest_prompt_ids()
    config = AutoConfig.from_pretrained(model_dirs(case))
    for key, value in changes.items():
        setattr(getattr(config, sub), key, value)
    model = AutoModelForCausalLM.from_pretrained(model_dirs(case), config=config,
                                                 dtype=torch.float32)
    assert_changes_logits(hf_logits(model_dirs(case), ids), logits(model, ids),
                          f"{case}: {sub} {changes}")


def _octavo_model(model_dir: str):
    config = AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config)(config)
    load_weights(model, model_dir)
    return model


# The random biases of use_bias dominate the hidden states, so that every token of that case
# goes to the same few experts; its expert math is the other ERNIE case's.
SPREAD_CASES = [case for case in CASES if case != "ernie4_5_moe-bias"]


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_routing_uses_many_experts(case, model_dirs, monkeypatch):
    """Every MoE layer sends the longest prompt's tokens to at least half of its experts."""
    from tp_util import one_rank_logits

    used: dict[FusedMoE, set] = {}
    route = FusedMoE._route

    def spy(self, impl, router_logits):
        weights, ids = route(self, impl, router_logits)
        used.setdefault(self, set()).update(ids.flatten().tolist())
        return weights, ids

    monkeypatch.setattr(FusedMoE, "_route", spy)
    # the Python layers, whose routing the spy sees (the C++ decoder plan routes in C++)
    monkeypatch.setenv("OCTAVO_CPU_DECODER_PLAN", "0")
    one_rank_logits(model_dirs(case), [longest_prompt_ids()])
    assert used, f"{case}: no MoE layer ran"
    for module, ids in used.items():
        assert len(ids) >= module.num_experts // 2, f"{case}: a layer used only experts {ids}"


def _runner_logits(model_dir: str, dtype: torch.dtype, native: bool) -> torch.Tensor:
    """Logits of the longest prompt through the kernels (packed expert weights, the plain copy
    released) or through the plain-PyTorch references, with weights in `dtype`."""
    from test_model_forward import MiniRunner

    from octavo.models.layers.custom_op import native_ops

    config = AutoConfig.from_pretrained(model_dir)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the model's weights and the test runner's KV caches
    try:
        model = get_model_class(config)(config)
        load_weights(model, model_dir)
        for module in model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
        assert moe and all(m.w13_weight.numel() == 0 for m in moe), "plain expert weights kept"
        with native_ops(native):
            return MiniRunner(model).step([(0, longest_prompt_ids())])
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", ["mixtral-sliding-top3", "glm4_moe"])
def test_kernel_path_matches_reference_path(case, model_dirs, monkeypatch):
    """The fused-MoE kernel path gives the plain-PyTorch reference path's logits in fp32; in
    bf16 its error against fp32 is at most about twice the bf16 reference's."""
    # the dense layers' oneDNN packing is beside the point here (and needs AVX-512 for bf16)
    monkeypatch.setenv("OCTAVO_CPU_ONEDNN_LINEAR", "0")
    path = model_dirs(case)
    exact = _runner_logits(path, torch.float32, native=True)
    torch.testing.assert_close(_runner_logits(path, torch.float32, native=False), exact,
                               atol=1e-4, rtol=0)
    fast_err = (_runner_logits(path, torch.bfloat16, native=False) - exact).abs().max().item()
    ref_err = (_runner_logits(path, torch.bfloat16, native=True) - exact).abs().max().item()
    assert 0 < ref_err and fast_err <= 2 * ref_err + 1e-3, (fast_err, ref_err)


@pytest.mark.parametrize("case", ["qwen2_moe", "mixtral", "phimoe", "granitemoeshared",
                                  "ernie4_5_moe", "glm4_moe"])
def test_stacked_expert_layout_loads_like_per_expert(case, model_dirs, tmp_path):
    """transformers 5's own layout (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I] and its module names, written with save_original_format=False) gives the same
    model."""
    from tp_util import one_rank_logits

    per_expert = model_dirs(case)
    model = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    stacked = str(tmp_path / "stacked")
    model.save_pretrained(stacked, save_original_format=False)
    names = load_file(os.path.join(stacked, "model.safetensors")).keys()
    assert any(n.endswith("experts.gate_up_proj") for n in names), sorted(names)[:20]
    seqs = [list(range(3, 16)), list(range(40, 61))]
    torch.testing.assert_close(one_rank_logits(stacked, seqs), one_rank_logits(per_expert, seqs),
                               atol=0, rtol=0)


def test_missing_expert_weights_are_an_error(model_dirs, tmp_path):
    path = model_dirs("mixtral")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json",):
        (broken / name).write_text(open(os.path.join(path, name)).read())
    model = _octavo_model(str(broken))
    with pytest.raises(ValueError, match="expert weights"):
        for module in model.modules():
            if isinstance(module, FusedMoE):
                module.process_weights_after_loading()


def test_expert_weight_loader_layouts_and_errors():
    """Per-expert, stacked, flattened and transposed layouts land in the same w13/w2; a wrong
    shape or expert index is a ValueError naming it."""
    e, i, h = 3, 4, 5
    gate, up, down = torch.randn(e, i, h), torch.randn(e, i, h), torch.randn(e, h, i)
    layouts = {
        "per expert": [(g, (x, "w1")) for x, g in enumerate(gate)]
        + [(u, (x, "w3")) for x, u in enumerate(up)] + [(d, (x, "w2")) for x, d in enumerate(down)],
        "stacked": [(torch.cat([gate, up], 1), "w13"), (down, "w2")],
        "flattened (DBRX)": [(gate.reshape(e * i, h), "w1"), (up.reshape(e * i, h), "w3"),
                             (down.transpose(1, 2).reshape(e * i, h), "w2_t")],
    }
    for what, tensors in layouts.items():
        moe = FusedMoE(e, 2, h, i)
        for tensor, shard in tensors:
            kind = shard[1] if isinstance(shard, tuple) else shard
            param = moe.w2_weight if kind in ("w2", "w2_t") else moe.w13_weight
            moe.weight_loader(param, tensor, shard)
        torch.testing.assert_close(moe.w13_weight.data, torch.cat([gate, up], 1), msg=what)
        torch.testing.assert_close(moe.w2_weight.data, down, msg=what)
    moe = FusedMoE(e, 2, h, i)
    with pytest.raises(ValueError, match=r"\(4, 6\) should be \(4, 5\)"):
        moe.weight_loader(moe.w13_weight, torch.randn(i, h + 1), (0, "w1"))
    with pytest.raises(ValueError, match="expert 3 is out of range"):
        moe.weight_loader(moe.w13_weight, gate[0], (3, "w1"))
    with pytest.raises(ValueError, match="intermediate size"):
        from octavo.models.layers.parallel_state import set_tensor_parallel
        set_tensor_parallel(0, 3)
        try:
            FusedMoE(e, 2, h, i)
        finally:
            set_tensor_parallel(0, 1)


# Experts' intermediate size split across ranks (with a shared expert and a dense layer in
# Qwen2-MoE, top-3 and a sliding window in Mixtral, a shared MLP in Granite MoE Shared, DBRX's
# all-expert tensors split per rank, GLM-4.5's grouped fp32 router)
TP_CASES = ["mixtral-sliding-top3", "qwen2_moe", "granitemoeshared", "dbrx", "glm4_moe"]


def test_tensor_parallel_two_ranks_match_one(model_dirs, tmp_path):
    assert_two_ranks_match_one({case: model_dirs(case) for case in TP_CASES}, tmp_path)


def test_olmoe_refuses_tensor_parallelism(model_dirs):
    """OLMoE's q/k norm spans all heads, which two ranks would split."""
    assert_refuses_tensor_parallelism(model_dirs("olmoe"))
