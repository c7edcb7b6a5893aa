"""kv_cache_dtype="fp8" through the engine: twice the KV blocks of a bf16 cache in the same
memory, generation through the CPU kernels matching the plain-PyTorch ops over the same fp8
cache, close to the model-dtype cache, and clear errors where it does not apply."""
import os

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


# ---- K/V scales: calculated from the first batch, or read from the checkpoint -----------------

def _small_values_model(src: str, dst, extra: dict | None = None) -> str:
    """The model with every layer's V 1000x smaller (v_proj / 1000, o_proj x 1000: the same
    function), so that |V| < 2^-7 and an unscaled fp8 cache stores V as zeros; `extra`: more
    checkpoint tensors (name -> tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    weights = load_file(path)
    for name in list(weights):
        if name.endswith("v_proj.weight"):
            weights[name] = weights[name] / 1000
        elif name.endswith("o_proj.weight"):
            weights[name] = weights[name] * 1000
    weights.update(extra or {})
    save_file(weights, path, metadata={"format": "pt"})
    return str(dst)


def _prompt_logprobs(llm):
    outs = llm.generate([{"prompt_token_ids": p * 2} for p in PROMPTS],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.cat([torch.tensor([next(iter(lp.values())).logprob for lp in o.prompt_logprobs[1:]])
                      for o in outs])


@pytest.fixture(scope="module")
def small_v_dir(model_dir, tmp_path_factory):
    return _small_values_model(model_dir, tmp_path_factory.mktemp("small_v") / "m")


def test_calculated_kv_scales_keep_small_values(small_v_dir):
    """calculate_kv_scales: each layer's scales from the first batch (largest |K| -> 200,
    |V| -> 100), so values the unscaled cache flushes to zero survive: the prompt logprobs come
    close to the bf16 cache's, where unscaled fp8 ones are far off."""
    ref = _prompt_logprobs(LLM(small_v_dir, dtype="bfloat16", **KV))
    plain = _prompt_logprobs(LLM(small_v_dir, dtype="bfloat16", kv_cache_dtype="fp8", **KV))
    llm = LLM(small_v_dir, dtype="bfloat16", kv_cache_dtype="fp8", calculate_kv_scales=True, **KV)
    scaled = _prompt_logprobs(llm)
    layers = llm.llm_engine.executor.runner.attn_layers
    assert all(0 < m.v_scale < 2.0 ** -7 / 100 and m.k_scale > 0 for m in layers)
    assert not any(m.calculate_kv_scales for m in layers)
    assert (plain - ref).abs().max() > 1.0
    torch.testing.assert_close(scaled, ref, rtol=0, atol=0.25)
    # later batches keep the first batch's scales; the plain-PyTorch ops compute the same ones
    before = [(m.k_scale, m.v_scale) for m in layers]
    again = _prompt_logprobs(llm)
    assert [(m.k_scale, m.v_scale) for m in layers] == before
    torch.testing.assert_close(again, scaled, rtol=0, atol=1e-3)
    with native_ops(True):
        native = LLM(small_v_dir, dtype="bfloat16", kv_cache_dtype="fp8", calculate_kv_scales=True,
                     enforce_eager=True, **KV)
        got = _prompt_logprobs(native)
    for m, n in zip(layers, native.llm_engine.executor.runner.attn_layers):
        assert m.k_scale == pytest.approx(n.k_scale, rel=1e-2)
        assert m.v_scale == pytest.approx(n.v_scale, rel=1e-2)
    torch.testing.assert_close(got, scaled, rtol=0, atol=5e-2)


@pytest.mark.parametrize("naming", ["k_scale", "kv_scale", "output_scale"])
def test_checkpoint_kv_scales(model_dir, small_v_dir, tmp_path, naming):
    """Scales stored in the checkpoint (vLLM's names) are each layer's: with them the fp8 cache
    keeps the small values; an 'auto' cache ignores them."""
    from safetensors.torch import load_file
    n_layers = sum(1 for n in load_file(os.path.join(model_dir, "model.safetensors"))
                   if n.endswith("v_proj.weight"))
    extra = {}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn"
        if naming == "k_scale":
            extra.update({f"{p}.k_scale": torch.tensor(0.02 + i / 100), f"{p}.v_scale": torch.tensor(3e-5)})
        elif naming == "kv_scale":
            extra[f"{p}.kv_scale"] = torch.tensor([3e-5])
        else:
            extra.update({f"{p}.k_proj.output_scale": torch.tensor([0.05, 0.07]),
                          f"{p}.v_proj.output_scale": torch.tensor(3e-5)})
    path = _small_values_model(model_dir, tmp_path / "m", extra)
    llm = LLM(path, dtype="bfloat16", kv_cache_dtype="fp8", **KV)
    layers = llm.llm_engine.executor.runner.attn_layers
    want_k = {"k_scale": [0.02 + i / 100 for i in range(n_layers)], "kv_scale": [3e-5] * n_layers,
              "output_scale": [0.07] * n_layers}[naming]
    assert [m.k_scale for m in layers] == pytest.approx(want_k)
    assert [m.v_scale for m in layers] == pytest.approx([3e-5] * n_layers)
    ref = _prompt_logprobs(LLM(small_v_dir, dtype="bfloat16", **KV))
    if naming != "kv_scale":    # (K / 3e-5 saturates: kv_scale fits V only)
        torch.testing.assert_close(_prompt_logprobs(llm), ref, rtol=0, atol=0.25)
    auto = _prompt_logprobs(LLM(path, dtype="bfloat16", **KV))
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)


def test_kv_scale_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="calculate_kv_scales=True scales an fp8 KV cache"):
        EngineConfig(model=model_dir, calculate_kv_scales=True)
    path = _small_values_model(model_dir, tmp_path / "m",
                               {"model.layers.0.self_attn.v_scale": torch.tensor(0.0)})
    with pytest.raises(ValueError, match="a KV-cache scale must be positive and finite"):
        LLM(path, kv_cache_dtype="fp8", **KV)
