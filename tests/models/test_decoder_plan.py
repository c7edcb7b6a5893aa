"""The C++ decoder stack (models/layers/decoder_plan.py, csrc/cpu/decoder_plan.cpp) against the
Python layers it replaces: on 16 families it takes (bf16 on octavo's packed GEMM, fp32 on
oneDNN's, INT4 linears, the default GGUF model), a model generates the same tokens with
bit-identical top-5 logprobs with the plan on and off (OCTAVO_CPU_DECODER_PLAN=0), over batched
prompts of different lengths, chunked prefill (a 16-token step budget) and a preemption; the plan
must really have run the steps, and the layers it does not take must say why."""
from __future__ import annotations

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.models.layers import cpu_gemm, decoder_plan

from parity import tiny_model_dirs

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.08)
QWEN_MOE = dict(num_experts=8, moe_intermediate_size=48, num_experts_per_tok=2)

# case -> (architecture, model_type, config fields); each takes the plan
PLANNED = {
    # q/k/v/o and MLP biases
    "llama-bias": ("LlamaForCausalLM", "llama", dict(attention_bias=True, mlp_bias=True)),
    # a sliding window shorter than the prompts
    "mistral": ("MistralForCausalLM", "mistral", dict(sliding_window=6)),
    # per-head q/k RMSNorm, one KV head
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(head_dim=32, num_key_value_heads=1)),
    "mixtral-top3": ("MixtralForCausalLM", "mixtral",
                     dict(num_local_experts=6, num_experts_per_tok=3)),
    # a shared expert with its sigmoid gate, layer 1 dense
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe",
                  dict(QWEN_MOE, shared_expert_intermediate_size=80, mlp_only_layers=[1],
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(QWEN_MOE, norm_topk_prob=True)),
    # a router kept in fp32, sigmoid routing in groups with the score-correction bias, scaling,
    # shared experts
    "glm4_moe": ("Glm4MoeForCausalLM", "glm4_moe", dict(
        n_routed_experts=8, moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, num_experts_per_tok=2)),
    # the families with other norm slots, multipliers and clamps
    "gemma2": ("Gemma2ForCausalLM", "gemma2", dict(
        num_hidden_layers=4, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0, initializer_range=0.2, tie_word_embeddings=True)),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", dict(
        num_hidden_layers=4, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=3.0, initializer_range=0.2)),
    "granite": ("GraniteForCausalLM", "granite", dict(
        embedding_multiplier=4.0, attention_multiplier=0.5, residual_multiplier=0.5,
        logits_scaling=2.0)),
    "olmo2": ("Olmo2ForCausalLM", "olmo2", dict()),
    "smollm3": ("SmolLM3ForCausalLM", "smollm3", dict(
        num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8)),
    "glm4": ("Glm4ForCausalLM", "glm4", dict(partial_rotary_factor=0.5, attention_bias=True)),
    # an fp32 router with the score-correction bias, a shared expert, layer 0 dense
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", dict(
        moe_num_experts=8, moe_intermediate_size=48, moe_num_shared_experts=1,
        moe_layer_start_index=1, use_bias=False, moe_k=2)),
    "olmoe": ("OlmoeForCausalLM", "olmoe", dict(num_experts=8, clip_qkv=0.6, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeForCausalLM", "granitemoe", dict(
        num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=4.0,
        attention_multiplier=0.5, residual_multiplier=0.5, logits_scaling=2.0)),
}
# case -> (architecture, model_type, config fields, words of the reason the plan is not taken)
NOT_PLANNED = {
    "cohere": ("CohereForCausalLM", "cohere", dict(logit_scale=0.5), "Cohere"),
    "phimoe": ("PhimoeForCausalLM", "phimoe", dict(num_local_experts=4, num_experts_per_tok=2),
               "LayerNorm"),
}
CASES = {**PLANNED, **{k: v[:3] for k, v in NOT_PLANNED.items()}}


def _skip_without_kernel():
    if not cpu_gemm.kernel_enabled(torch.bfloat16):
        pytest.skip("this CPU runs bf16 linears on oneDNN (no avx512_bf16, not AVX2-only), so "
                    "no layer qualifies for the plan")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return tiny_model_dirs(tmp_path_factory, CASES, COMMON, biases=True)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(3, 200, (n,), generator=g).tolist()}
            for n in (5, 23, 1, 37)]


def _kv_bytes(case: str, blocks: int, dtype: str) -> int:
    # K and V of `blocks` 4-token blocks over all layers: 18 hold any one sequence of
    # max_model_len 64 but not the 31 that _prompts() need at once
    f = {**COMMON, **PLANNED[case][2]}
    size = 2 if dtype == "bfloat16" else 4
    return blocks * f["num_hidden_layers"] * 2 * 4 * f["num_key_value_heads"] * f["head_dim"] * size


def _generate(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: e.logprob for t, e in step.items()}
                                      for step in o.outputs[0].logprobs]) for o in outs]


def _assert_plan_equals_python(llm, prompts, monkeypatch, what: str) -> None:
    """Generate with the plan (which must run every step), then with the Python layers
    (OCTAVO_CPU_DECODER_PLAN=0, which must run every step); the tokens and top-5 logprobs must
    be bit-identical. (Without prefix caching: a second run that hits the cache computes its
    prompts in other chunks, and some kernels' summation order depends on the row count.)"""
    model = llm.llm_engine.runner.model.model
    calls = {"plan": 0, "python": 0}
    original = decoder_plan.plan_for

    def counting(m, positions):
        plan = original(m, positions)
        calls["plan" if plan is not None else "python"] += 1
        return plan

    monkeypatch.setattr(decoder_plan, "plan_for", counting)
    with_plan = _generate(llm, prompts)
    plan, why = decoder_plan.plan_status(model)
    assert plan is not None, f"{what}: the plan was not built: {why}"
    assert plan.num_layers() == len(model.stage_layers)
    assert calls["plan"] > 0 and calls["python"] == 0, calls

    monkeypatch.setenv("OCTAVO_CPU_DECODER_PLAN", "0")
    calls.update(plan=0, python=0)
    without = _generate(llm, prompts)
    monkeypatch.delenv("OCTAVO_CPU_DECODER_PLAN")
    assert calls["plan"] == 0 and calls["python"] > 0, calls
    for i, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(with_plan, without)):
        assert ids_a == ids_b, f"{what}: prompt {i}: tokens differ with the plan"
        assert lp_a == lp_b, f"{what}: prompt {i}: logprobs differ with the plan"


@pytest.mark.parametrize("case,dtype,quantization",
                         [(c, "bfloat16", None) for c in PLANNED]
                         + [("llama-bias", "bfloat16", "int4"), ("qwen3", "bfloat16", "int4"),
                            ("llama-bias", "float32", None), ("qwen2_moe", "float32", None),
                            ("mistral", "float32", "int4"), ("gemma2", "float32", None),
                            ("olmoe", "float32", None)])
def test_plan_equals_python_layers(case, dtype, quantization, model_dirs, monkeypatch):
    if dtype == "bfloat16":
        _skip_without_kernel()
    # 16-token steps chunk the prompts; 18 blocks of 4 tokens cannot hold all four sequences,
    # so the scheduler preempts
    llm = LLM(model=model_dirs(case), dtype=dtype, max_num_batched_tokens=16, block_size=4,
              kv_cache_memory=_kv_bytes(case, 18, dtype), max_model_len=64,
              quantization=quantization, enable_prefix_caching=False)
    _assert_plan_equals_python(llm, _prompts(), monkeypatch, f"{case} {dtype} {quantization}")
    assert llm.llm_engine.scheduler.num_preemptions > 0, f"{case}: no preemption happened"
    if quantization == "int4":
        qkv = llm.llm_engine.runner.model.model.stage_layers[0].self_attn.qkv_proj
        assert qkv.int4_weight is not None, "the INT4 kernel path was not taken"


def test_plan_equals_python_layers_on_the_default_model(default_gguf, monkeypatch):
    """The default model (SmolLM2-135M, GGUF Q4_1): 4-bit linears on the INT4 kernel."""
    llm = LLM(model=default_gguf, max_num_batched_tokens=32, enable_prefix_caching=False)
    _assert_plan_equals_python(llm, _prompts(), monkeypatch, "the default model")


@pytest.mark.parametrize("case", list(NOT_PLANNED))
def test_layers_the_plan_does_not_take_say_why(case, model_dirs):
    llm = LLM(model=model_dirs(case), dtype="float32", kv_cache_memory=1 << 22)
    _generate(llm, _prompts()[:1])
    plan, why = decoder_plan.plan_status(llm.llm_engine.runner.model.model)
    assert plan is None and NOT_PLANNED[case][3] in why, why


def test_wrapped_layers_are_refused(model_dirs):
    llm = LLM(model=model_dirs("qwen3"), dtype="float32", kv_cache_memory=1 << 22)
    layer = llm.llm_engine.runner.model.model.stage_layers[0]
    decoder_plan._layer_args(layer)  # qualifies as loaded
    # a wrapped projection (as LoRA wraps them) is not a plain linear
    layer.self_attn.o_proj = torch.nn.Sequential(layer.self_attn.o_proj)
    with pytest.raises(decoder_plan._NotEligible, match="Sequential"):
        decoder_plan._layer_args(layer)
