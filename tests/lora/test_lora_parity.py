"""Multi-LoRA: greedy ids and logprobs equal to transformers + PEFT for adapters built here
(random A and nonzero B), several adapters and the base model in one batch, slot swapping with
more adapters than slots, rsLoRA, fused checkpoint projections, prefix caching per adapter, and
clear errors for bad adapters."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lora_util import hf_greedy_one, peft_model, save_adapter
from octavo import LLM, SamplingParams
from octavo.lora.request import LoRARequest

PROMPTS = ["Hello, my name is", "The capital of France is",
           "Once upon a time, there was a little robot who loved to read books and",
           "A", "She sells sea shells by the sea shore"]
MAX_TOKENS = 10
KV = 1 << 24


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM")


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """name -> directory: all projections (r 8), attention-only rsLoRA (r 4, alpha 8), MLP-only
    with a larger rank (r 16)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": save_adapter(base_dir, str(root / "all"), seed=1, r=8, alpha=16),
        "attn_rs": save_adapter(base_dir, str(root / "attn_rs"), seed=2, r=4, alpha=8,
                                targets=("q_proj", "v_proj", "o_proj"), use_rslora=True),
        "mlp": save_adapter(base_dir, str(root / "mlp"), seed=3, r=16, alpha=8,
                            targets=("gate_proj", "up_proj", "down_proj")),
    }


_REF_CACHE: dict = {}


def reference(base_dir, adapter_dir, ids):
    key = (base_dir, adapter_dir, tuple(ids))
    if key not in _REF_CACHE:
        model_key = ("model", base_dir, adapter_dir)
        if model_key not in _REF_CACHE:
            _REF_CACHE[model_key] = peft_model(base_dir, adapter_dir)
        model = _REF_CACHE[model_key]
        _REF_CACHE[key] = hf_greedy_one(model, ids, MAX_TOKENS)
    return _REF_CACHE[key]


def assert_matches_peft(base_dir, outputs, adapter_dirs, atol=2e-4):
    for out, adapter in zip(outputs, adapter_dirs):
        tokens, logprobs = reference(base_dir, adapter, out.prompt_token_ids)
        ours = out.outputs[0]
        what = f"adapter {adapter and os.path.basename(adapter)}, prompt {out.prompt!r}"
        assert ours.token_ids == tokens, what
        for step, (entry, ref) in enumerate(zip(ours.logprobs, logprobs)):
            vals, ids = ref.topk(3)
            for value, token in zip(vals.tolist(), ids.tolist()):
                assert token in entry, f"{what}: step {step} misses top-3 token {token}"
                assert entry[token].logprob == pytest.approx(value, abs=atol), what


def params():
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3)


def requests(adapters):
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}


def test_adapters_change_the_output(base_dir, adapters):
    """The test adapters are strong enough that a missing LoRA path cannot pass unnoticed."""
    ids = [1, 15, 27, 33, 8, 90]
    base_tokens, base_lp = reference(base_dir, None, ids)
    for path in adapters.values():
        tokens, lp = reference(base_dir, path, ids)
        assert (lp[0] - base_lp[0]).abs().max() > 0.05


def test_mixed_batch_matches_peft(base_dir, adapters):
    """Every adapter and the base model in the same steps (max_loras slots for all three)."""
    reqs = requests(adapters)
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=16,
              kv_cache_memory=KV)
    names = ["all", None, "attn_rs", "mlp", "all", None, "mlp", "attn_rs"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.generate(prompts, params(), use_tqdm=False,
                        lora_request=[reqs[n] if n else None for n in names])
    assert_matches_peft(base_dir, outs, [adapters[n] if n else None for n in names])
    assert llm.list_loras() == {1, 2, 3}


def test_slot_swapping_more_adapters_than_slots(base_dir, adapters):
    """Three adapters through one device slot and a host cache of two: requests of different
    adapters wait for each other, adapters are swapped in and reloaded from disk, and every
    output still matches PEFT."""
    reqs = requests(adapters)
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_lora_rank=16, kv_cache_memory=KV)
    names = ["all", "attn_rs", None, "mlp", "all", "mlp"]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(names))], params(),
                        use_tqdm=False, lora_request=[reqs[n] if n else None for n in names])
    assert_matches_peft(base_dir, outs, [adapters[n] if n else None for n in names])
    manager = llm.llm_engine.runner.lora
    assert manager.num_slot_loads >= 3 and len(manager.cpu_cache) == 1
    # a second round: the slot holds the last adapter; the others come back from disk
    before = manager.num_disk_loads
    outs = llm.generate(PROMPTS[:2], params(), use_tqdm=False,
                        lora_request=[reqs["attn_rs"], reqs["all"]])
    assert_matches_peft(base_dir, outs, [adapters["attn_rs"], adapters["all"]])
    assert manager.num_disk_loads > before


def test_one_lora_request_for_every_prompt_and_chunked_prefill(base_dir, adapters):
    """A single LoRARequest applies to all prompts; small token budgets chunk the prompts."""
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_lora_rank=8,
              max_num_batched_tokens=16, kv_cache_memory=KV, enforce_eager=True)
    outs = llm.generate(PROMPTS, params(), use_tqdm=False,
                        lora_request=LoRARequest("all", 7, adapters["all"]))
    assert_matches_peft(base_dir, outs, [adapters["all"]] * len(PROMPTS))


def test_prefix_cache_is_per_adapter(base_dir, adapters):
    """The same long prompt with an adapter, then without, then with another: no request may
    reuse another adapter's KV blocks, but the same adapter reuses its own."""
    reqs = requests(adapters)
    llm = LLM(model=base_dir, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              kv_cache_memory=KV, block_size=8)
    prompt = PROMPTS[2] + " " + PROMPTS[4]
    runs = [("all", reqs["all"]), (None, None), ("mlp", reqs["mlp"]), ("all", reqs["all"])]
    cached = []
    for name, req in runs:
        out = llm.generate([prompt], params(), use_tqdm=False, lora_request=req)
        assert_matches_peft(base_dir, out, [adapters[name] if name else None])
        cached.append(out[0].num_cached_tokens)
    assert cached[:3] == [0, 0, 0] and cached[3] > 0


def test_fused_checkpoint_projections(tmp_path):
    """An adapter of a model whose checkpoint already fuses qkv_proj / gate_up_proj (Phi-3):
    one A per fused module, B cut into octavo's projections."""
    from tiny_models import save_tiny_model
    phi = save_tiny_model(str(tmp_path / "phi3"), "phi3", "Phi3ForCausalLM", hidden_size=64,
                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                          initializer_range=0.08, rms_norm_eps=1e-5)
    ad = save_adapter(phi, str(tmp_path / "phi3_lora"), seed=5, r=8, alpha=16,
                      targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    llm = LLM(model=phi, dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory=KV)
    outs = llm.generate(PROMPTS[:3], params(), use_tqdm=False,
                        lora_request=[LoRARequest("phi", 1, ad), None, LoRARequest("phi", 1, ad)])
    assert_matches_peft(phi, outs, [ad, None, ad])


def test_bf16_mixed_batch_close_to_peft(base_dir, adapters):
    """bf16: the first step's logprobs of each row near the fp32 PEFT reference."""
    reqs = requests(adapters)
    llm = LLM(model=base_dir, dtype="bfloat16", enable_lora=True, max_loras=2, max_lora_rank=16,
              kv_cache_memory=KV)
    names = ["all", None, "mlp"]
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=1, logprobs=3),
                        use_tqdm=False, lora_request=[reqs[n] if n else None for n in names])
    for out, name in zip(outs, names):
        _, lp = reference(base_dir, adapters[name] if name else None, out.prompt_token_ids)
        entry = out.outputs[0].logprobs[0]
        for token, value in entry.items():
            assert value.logprob == pytest.approx(lp[0][token].item(), abs=0.1)


# ---- errors -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_llm(base_dir):
    return LLM(model=base_dir, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
               kv_cache_memory=KV)


def test_bad_adapter_path_raises(lora_llm, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        lora_llm.generate("hi", params(), lora_request=LoRARequest("x", 1, str(tmp_path / "no")))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lora_llm.generate("hi", params(), lora_request=LoRARequest("x", 1, str(tmp_path)))
    assert not lora_llm.llm_engine.has_unfinished_requests()


def test_rank_above_max_lora_rank_raises(lora_llm, adapters):
    with pytest.raises(ValueError, match="max_lora_rank=8"):
        lora_llm.generate(["hi", "there"], params(),
                          lora_request=[None, LoRARequest("mlp", 3, adapters["mlp"])])
    assert not lora_llm.llm_engine.has_unfinished_requests()


def test_unsupported_adapters_raise(lora_llm, base_dir, tmp_path):
    emb = save_adapter(base_dir, str(tmp_path / "emb"), seed=1, r=4, targets=("embed_tokens",))
    with pytest.raises(ValueError, match="not a LoRA A/B weight of a linear layer|targets module"):
        lora_llm.generate("hi", params(), lora_request=LoRARequest("emb", 5, emb))
    dora = str(tmp_path / "dora")
    save_adapter(base_dir, dora, seed=1, r=4, targets=("q_proj",))
    cfg_path = os.path.join(dora, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["use_dora"] = True
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="use_dora"):
        lora_llm.generate("hi", params(), lora_request=LoRARequest("dora", 6, dora))


def test_lora_request_needs_enable_lora(base_dir, adapters):
    llm = LLM(model=base_dir, dtype="float32", kv_cache_memory=KV)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate("hi", params(), lora_request=LoRARequest("all", 1, adapters["all"]))


def test_bad_lora_settings_raise(base_dir):
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(model=base_dir, enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/tmp")
    with pytest.raises(ValueError, match="lora_requests for"):
        LLM(model=base_dir, dtype="float32", enable_lora=True, kv_cache_memory=KV).generate(
            ["a", "b"], params(), lora_request=[None])
