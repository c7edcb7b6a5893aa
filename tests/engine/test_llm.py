"""LLM.generate end to end on a tiny Llama: batching, prefix caching, preemption, chunked
prefill, sampling controls, input forms and bad input."""
import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.request import RequestStatus

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, there was a little robot who loved to read books.",
    "The capital of France is Paris. The capital of Italy is",
    "A",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
MIB = 1 << 20


def make_llm(model_dir, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_cache_memory", 16 * MIB)
    return LLM(model=model_dir, **kw)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return make_llm(llama_dir)


@pytest.fixture(scope="module")
def alone(llm):
    """Each prompt's greedy tokens when it runs by itself."""
    return [tokens(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_batch_equals_alone(llm, alone):
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone


def test_prefix_caching_on_and_off(llama_dir, alone):
    shared = "The capital of France is Paris. The capital of Italy is Rome. " * 3
    prompts = [shared + p for p in PROMPTS[:4]]
    off = make_llm(llama_dir, enable_prefix_caching=False)
    on = make_llm(llama_dir, enable_prefix_caching=True, block_size=4)
    expected = [tokens(off.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]
    first = on.generate(prompts, GREEDY, use_tqdm=False)
    second = on.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(first) == expected and tokens(second) == expected
    assert all(o.num_cached_tokens > 0 for o in second)          # the second round hit the cache
    assert on.llm_engine.kv.prefix_hits > 0
    assert off.llm_engine.kv.prefix_hits == 0


def test_reset_prefix_cache(llama_dir):
    # vLLM's LLM.reset_prefix_cache: after it the same prompt is computed whole, with the same
    # tokens; refused (False, nothing changed) while a request holds blocks
    llm = make_llm(llama_dir, block_size=4)
    prompt = "The capital of France is Paris. The capital of Italy is Rome."
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    second = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    third = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert third.num_cached_tokens == 0
    assert third.outputs[0].token_ids == second.outputs[0].token_ids == first.outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("held", prompt, GREEDY)
    engine.step()                                     # the prompt's blocks are allocated
    hits = engine.kv.prefix_hits
    assert not llm.reset_prefix_cache()
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0   # kept
    assert engine.kv.prefix_hits > hits


def test_preemption_keeps_outputs(llama_dir, alone):
    # 16 blocks of 4 tokens: eight requests cannot all hold their blocks at once
    engine_kw = dict(block_size=4, max_model_len=64, max_num_seqs=8)
    small = make_llm(llama_dir, **engine_kw)
    per_block = small.llm_engine.runner.bytes_per_block()
    small = make_llm(llama_dir, kv_cache_memory=16 * per_block, **engine_kw)
    assert small.llm_engine.kv.num_blocks == 16
    out = small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert tokens(out) == alone
    assert small.llm_engine.kv.pool.num_free == 16


def test_preemption_keeps_prompt_logprobs(llama_dir, llm):
    # a preempted request recomputes its prompt: its prompt logprobs must not be collected twice
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1)
    expected = [llm.generate(p, params, use_tqdm=False)[0].prompt_logprobs for p in PROMPTS]
    engine_kw = dict(block_size=4, max_model_len=64, max_num_seqs=8)
    per_block = make_llm(llama_dir, **engine_kw).llm_engine.runner.bytes_per_block()
    small = make_llm(llama_dir, kv_cache_memory=16 * per_block, **engine_kw)
    out = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    for o, want in zip(out, expected):
        assert len(o.prompt_logprobs) == len(o.prompt_token_ids) == len(want)
        for got_pos, want_pos in zip(o.prompt_logprobs[1:], want[1:]):
            assert got_pos.keys() == want_pos.keys()
            for tok in want_pos:
                assert abs(got_pos[tok].logprob - want_pos[tok].logprob) < 1e-4


def test_chunked_prefill_matches(llama_dir, alone):
    chunked = make_llm(llama_dir, max_num_batched_tokens=7, max_model_len=256)
    assert tokens(chunked.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone


def test_input_forms_and_per_prompt_params(llm, alone):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[1])
    out = llm.generate([{"prompt_token_ids": ids}, {"prompt": PROMPTS[0]}], GREEDY, use_tqdm=False)
    assert tokens(out) == [alone[1], alone[0]]
    assert out[0].prompt_token_ids == ids
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = llm.generate(PROMPTS[:2], [short, GREEDY], use_tqdm=False)
    assert tokens(out) == [alone[0][:3], alone[1]]
    assert out[0].outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_alone_and_in_batch(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    a = tokens(llm.generate(PROMPTS[2], p, use_tqdm=False))[0]
    b = tokens(llm.generate(PROMPTS, [p if i == 2 else SamplingParams(temperature=0.8, max_tokens=5)
                                      for i in range(len(PROMPTS))], use_tqdm=False))[2]
    assert a == b
    other = SamplingParams(temperature=1.0, seed=4321, max_tokens=10, ignore_eos=True)
    assert tokens(llm.generate(PROMPTS[2], other, use_tqdm=False))[0] != a


def test_n_samples_and_top_k_one(llm, alone):
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True)
    assert tokens(llm.generate(PROMPTS, top1, use_tqdm=False)) == alone


def test_stop_token_ids_and_min_max_tokens(llm, alone):
    target = alone[2]
    stop_id = target[4]
    first = target.index(stop_id)
    p = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True)
    out = llm.generate(PROMPTS[2], p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == target[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    p = SamplingParams(temperature=0, max_tokens=5, min_tokens=5, ignore_eos=True)
    assert len(llm.generate(PROMPTS[2], p, use_tqdm=False)[0].outputs[0].token_ids) == 5


def test_stop_strings_cut_the_text(llm):
    full = llm.generate(PROMPTS[3], GREEDY, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 4
    stop = text[2:4]
    cut = text.index(stop)
    for include in (False, True):
        p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                           include_stop_str_in_output=include)
        out = llm.generate(PROMPTS[3], p, use_tqdm=False)[0].outputs[0]
        assert out.text == (text[:cut + len(stop)] if include else text[:cut])
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert full.token_ids[:len(out.token_ids)] == out.token_ids


def test_prompt_logprobs_match_a_full_forward(llm, llama_dir):
    from transformers import AutoModelForCausalLM
    out = llm.generate(PROMPTS[3], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        assert len(entry) >= 2


def test_bad_prompts_raise_and_leave_the_engine_usable(llm, alone):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([PROMPTS[0], {"prompt_token_ids": []}], GREEDY, use_tqdm=False)
    too_long = {"prompt_token_ids": [5] * 600}
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([PROMPTS[0], too_long], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**6]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias|vocab"):
        llm.generate(PROMPTS[0], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert tokens(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == alone[:2]


def test_bad_request_does_not_disturb_running_ones(llm, alone):
    engine = llm.llm_engine
    engine.add_request("good-0", PROMPTS[0], GREEDY)
    engine.add_request("good-1", PROMPTS[1], GREEDY)
    engine.step()
    with pytest.raises(ValueError):
        engine.add_request("bad", {"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good-0", PROMPTS[0], GREEDY)
    engine.add_request("dropped", PROMPTS[2], GREEDY)
    engine.step()
    engine.abort_request("dropped")
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert done == {"good-0": alone[0], "good-1": alone[1]}
    assert engine.kv.pool.num_free == engine.kv.num_blocks


def test_engine_config_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(llama_dir, kv_cache_memory=4096, max_model_len=512)
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(llama_dir, max_model_len=10**6)
    with pytest.raises(ValueError, match="local path: .* does not exist"):
        make_llm(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="block_size"):
        make_llm(llama_dir, block_size=12)


def test_unknown_architecture_and_missing_weights(llama_dir, tmp_path):
    import json
    import shutil
    bad = tmp_path / "unknown"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM.*LlamaForCausalLM|LlamaForCausalLM.*NoSuch"):
        make_llm(str(bad))
    missing = tmp_path / "missing"
    shutil.copytree(llama_dir, missing)
    for f in missing.glob("*.safetensors"):
        f.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="safetensors|weight"):
        make_llm(str(missing))
    truncated = tmp_path / "truncated"
    shutil.copytree(llama_dir, truncated)
    for f in truncated.glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        make_llm(str(truncated))
