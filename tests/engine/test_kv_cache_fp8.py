"""kv_cache_dtype="fp8" through the engine: twice the KV blocks of a bf16 cache in the same
memory, generation through the CPU kernels matching the plain-PyTorch ops over the same fp8
cache, close to the model-dtype cache, and clear errors where it does not apply."""
import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.config import EngineConfig
from octavo.models.layers.custom_op import native_ops

KV = dict(kv_cache_memory=1 << 24, max_model_len=256, seed=0)
PROMPTS = [[5, 17, 33, 2 + i, 9, 40, 11, 3, 28, 19, 7, 60 + i] for i in range(3)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    # head size 64 (the fp8 decode passes' sizes), GQA 2
    return tiny_model_factory("LlamaForCausalLM", hidden_size=128, num_attention_heads=2,
                              num_key_value_heads=1)


def _generate(llm, prompts, **kw):
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True, **kw)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


def test_fp8_cache_holds_twice_the_blocks(model_dir):
    auto = LLM(model_dir, dtype="bfloat16", **KV)
    fp8 = LLM(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", **KV)
    assert fp8.llm_engine.kv.num_blocks == 2 * auto.llm_engine.kv.num_blocks
    caches = [m.k_cache for m in fp8.llm_engine.executor.runner.attn_layers]
    assert caches and all(c.dtype == torch.float8_e4m3fn for c in caches)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_generation_matches_native_ops(model_dir, dtype):
    """Greedy tokens from the CPU kernels (decode passes reading fp8 bytes) and each token's
    logprob, against the plain-PyTorch ops scoring the same sequences over their own fp8 cache."""
    llm = LLM(model_dir, dtype=dtype, kv_cache_dtype="fp8", **KV)
    outs = _generate(llm, PROMPTS)
    full = [p + list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)]
    with native_ops(True):
        ref = LLM(model_dir, dtype=dtype, kv_cache_dtype="fp8", enforce_eager=True, **KV)
        scored = ref.generate([{"prompt_token_ids": f} for f in full],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    for p, o, s in zip(PROMPTS, outs, scored):
        got = [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]
        want = [lp[t].logprob for lp, t in zip(s.prompt_logprobs[len(p):], o.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=5e-2)


def test_fp8_close_to_model_dtype_cache(model_dir):
    # the 8-bit cache changes each prompt's logprobs by little next to the bf16 one
    auto = LLM(model_dir, dtype="bfloat16", **KV)
    fp8 = LLM(model_dir, dtype="bfloat16", kv_cache_dtype="fp8_e4m3", **KV)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0)
    a, b = (llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
            for llm in (auto, fp8))
    for x, y in zip(a, b):
        la = torch.tensor([next(iter(lp.values())).logprob for lp in x.prompt_logprobs[1:]])
        lb = torch.tensor([next(iter(lp.values())).logprob for lp in y.prompt_logprobs[1:]])
        torch.testing.assert_close(lb, la, rtol=0, atol=0.25)


def test_fp8_errors(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e5m2' is not supported"):
        EngineConfig(model=model_dir, kv_cache_dtype="fp8_e5m2")


def test_fp8_prefix_cache_hit_reproduces_the_run(model_dir):
    # a second pass over the same prompts reads their K/V from cached fp8 blocks (prefix cache
    # hits) instead of writing them: the same greedy tokens and logprobs
    llm = LLM(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", **KV)
    prompts = [p * 3 for p in PROMPTS]                   # 36 tokens: two full cached blocks
    first, second = _generate(llm, prompts), _generate(llm, prompts)
    for a, b in zip(first, second):
        assert b.num_cached_tokens > 0
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [next(iter(lp.values())).logprob for lp in a.outputs[0].logprobs]
        lb = [next(iter(lp.values())).logprob for lp in b.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=0, atol=1e-3)
