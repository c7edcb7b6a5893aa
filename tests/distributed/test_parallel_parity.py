"""Tensor / pipeline parallelism through the multi-process executor (gloo, CPU processes): greedy
ids identical to the single-process engine, on batched prompts with chunked prefill (a token
budget of 16) and preemption (a KV cache of a few blocks per rank)."""
from __future__ import annotations

import os
import sys

import pytest

from tiny_models import build_tiny_model, save_tiny_model
from octavo import LLM, SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))

# four prompts of 3 to 37 tokens (test tokenizer); with a budget of 16 tokens the long ones
# are prefilled in chunks
PROMPTS = [
    "Once upon a time, there was a little robot who loved to read books and",
    "A",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &.",
    "The capital of France is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
# one request alone (never preempted) with the logprobs of its prompt tokens
PROMPT_LOGPROBS = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
ENGINE = dict(dtype="float32", max_model_len=64, block_size=8, max_num_batched_tokens=16,
              enable_prefix_caching=False)
# 9 blocks of 8 tokens per rank (8 hold max_model_len): the four requests need 12 at once
KV_BLOCKS = 9

LAYERS4 = dict(num_hidden_layers=4)
GEMMA2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, query_pre_attn_scalar=24, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"] * 2,
              attn_logit_softcapping=4.0, final_logit_softcapping=3.0, initializer_range=0.2,
              tie_word_embeddings=True)
MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2, pad_token_id=0, initializer_range=0.08, num_experts_per_tok=2,
               num_local_experts=8, tie_word_embeddings=False)
BLOOM = dict(hidden_size=64, n_head=4, n_layer=2, initializer_range=0.08, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)


def _build(name: str, root: str) -> tuple[str, dict]:
    """(model dir, extra LLM kwargs) of a case."""
    path = os.path.join(root, name)
    if name == "llama-gqa":            # 4 heads, 2 KV heads
        return build_tiny_model(path, "LlamaForCausalLM", **LAYERS4), {}
    if name == "qwen2-tied-1kv":       # tied embeddings; 1 KV head, replicated over 2 TP ranks
        return build_tiny_model(path, "Qwen2ForCausalLM", num_key_value_heads=1,
                                use_sliding_window=False, **LAYERS4), {}
    if name == "gemma2":
        return save_tiny_model(path, "gemma2", "Gemma2ForCausalLM", **GEMMA2), {}
    if name == "mixtral":
        return save_tiny_model(path, "mixtral", "MixtralForCausalLM", **MIXTRAL), {}
    if name == "bloom-alibi":
        return save_tiny_model(path, "bloom", "BloomForCausalLM", **BLOOM), {}
    if name == "baichuan-13b-alibi":   # Llama family with ALiBi (6 heads: 3 per TP rank)
        from test_parity_remote import build_case
        return build_case("baichuan-13b", path)[1], {"trust_remote_code": True}
    raise KeyError(name)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cache: dict[str, tuple[str, dict, list, int]] = {}

    def make(name: str):
        """(dir, kwargs, single-process outputs and prompt logprobs, bytes per KV block)"""
        if name not in cache:
            path, kw = _build(name, str(tmp_path_factory.mktemp("models")))
            llm = LLM(model=path, kv_cache_memory=1 << 22, **ENGINE, **kw)
            outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
            prompt = llm.generate(PROMPTS[0], PROMPT_LOGPROBS, use_tqdm=False)[0].prompt_logprobs
            cache[name] = (path, kw, outs, prompt, llm.llm_engine.runner.bytes_per_block())
        return cache[name]

    return make


def _per_rank_bytes(path: str, kw: dict, single_bytes: int, tp: int, pp: int) -> int:
    """Bytes of a KV block on one rank: the layers of its stage, its share of the KV heads (a
    KV head replicated over ranks when there are fewer heads than ranks)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=kw.get("trust_remote_code", False))
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return single_bytes * max(kv // tp, 1) // kv // pp


CASES = [
    ("llama-gqa", 2, 1), ("llama-gqa", 1, 2), ("llama-gqa", 2, 2),
    ("baichuan-13b-alibi", 2, 2), ("qwen2-tied-1kv", 2, 2), ("gemma2", 2, 2), ("mixtral", 2, 2),
    ("bloom-alibi", 2, 1),             # not Llama-family: tensor parallel only
]


@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{n}-tp{t}-pp{p}" for n, t, p in CASES])
def test_parallel_greedy_ids_match_single_process(case, name, tp, pp):
    path, kw, expected, expected_prompt, single_bytes = case(name)
    per_block = _per_rank_bytes(path, kw, single_bytes, tp, pp)
    llm = LLM(model=path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              kv_cache_memory=KV_BLOCKS * per_block, **ENGINE, **kw)
    try:
        engine = llm.llm_engine
        assert engine.runner is None and engine.kv.num_blocks == KV_BLOCKS
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
        assert engine.scheduler.num_preemptions > 0
        for ours, ref in zip(got, expected):
            _assert_logprobs_close(ours.outputs[0].logprobs, ref.outputs[0].logprobs)
        prompt = llm.generate(PROMPTS[0], PROMPT_LOGPROBS, use_tqdm=False)[0].prompt_logprobs
        _assert_logprobs_close(prompt, expected_prompt)
    finally:
        llm.llm_engine.executor.shutdown()
    assert all(not p.is_alive() for p in llm.llm_engine.executor.procs)


def _assert_logprobs_close(ours: list, ref: list) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        if b is None:                   # the first prompt token has none
            assert a is None
            continue
        assert a.keys() == b.keys()
        for token in b:
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-4)
