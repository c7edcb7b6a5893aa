"""octavo bench latency on the tiny Llama: percentiles ordered, TTFT/TPOT consistent; --profile
splits steps into their parts and leaves the engine unchanged."""
import json

import pytest

from octavo.bench import latency


def test_latency_fields(llama_dir, tmp_path, capsys):
    out = tmp_path / "lat.jsonl"
    latency.main(["--model", llama_dir, "--input-len", "8", "--output-len", "5",
                  "--batch-size", "3", "--num-iters-warmup", "1", "--num-iters", "4",
                  "--output-json", str(out)])
    text = capsys.readouterr().out
    (r,) = [json.loads(line) for line in open(out)]
    assert len(r["latencies"]) == 4
    p = [r["percentiles"][k] for k in ("10", "25", "50", "75", "90", "99")]
    assert p == sorted(p) and min(r["latencies"]) <= p[0] and p[-1] <= max(r["latencies"])
    assert min(r["latencies"]) <= r["avg_latency"] <= max(r["latencies"])
    assert 0 < r["avg_ttft"] < r["avg_latency"]
    # every request's tokens after the first fit in the time after its first token
    assert 0 < r["avg_tpot"] * 4 < r["avg_latency"]
    assert f"Avg latency: {r['avg_latency']:.6f} seconds" in text
    assert "99% percentile latency" in text and "Avg time to first token" in text


def test_latency_batches_do_not_hit_the_prefix_cache(llama_dir, tmp_path):
    # 40-token prompts hold two full 16-token blocks: reused across batches they would be found
    # cached from the second batch on, and TTFT would time a cached prompt
    out = tmp_path / "lat.jsonl"
    latency.main(["--model", llama_dir, "--input-len", "40", "--output-len", "3",
                  "--batch-size", "2", "--num-iters-warmup", "1", "--num-iters", "2",
                  "--output-json", str(out)])
    (r,) = [json.loads(line) for line in open(out)]
    assert r["engine"].get("enable_prefix_caching", True) is not False
    assert r["prefix_hits"] == 0


def test_latency_with_speculative_decoding_reports_acceptance(llama_dir, tmp_path, capsys):
    out = tmp_path / "lat.jsonl"
    latency.main(["--model", llama_dir, "--prompt", "a b c a b c a b c a b", "--temperature",
                  "0", "--output-len", "12", "--batch-size", "2", "--num-iters-warmup", "0",
                  "--num-iters", "2", "--output-json", str(out), "--speculative-config",
                  '{"method": "ngram", "num_speculative_tokens": 3}'])
    (r,) = [json.loads(line) for line in open(out)]
    sd = r["spec_decode"]
    # 2 iterations x 2 requests x 11 tokens after the first: every step emits >= 1 of them
    assert 0 < sd["num_drafts"] <= 44 and 0 <= sd["num_accepted_tokens"] <= sd["num_draft_tokens"]
    assert sd["mean_accepted_length"] == pytest.approx(1 + sd["num_accepted_tokens"] / sd["num_drafts"])
    assert f"acceptance rate {sd['acceptance_rate']:.3f}" in capsys.readouterr().out


def test_latency_rejects_bad_sizes(llama_dir, capsys):
    with pytest.raises(SystemExit):
        latency.main(["--model", llama_dir, "--batch-size", "0"])
    assert "--batch-size must be positive" in capsys.readouterr().err


def test_latency_profile_breaks_the_step_down(llama_dir, tmp_path, capsys):
    from octavo.bench.step_profile import SECTIONS
    from octavo.detokenizer import IncrementalDetokenizer

    original_update = IncrementalDetokenizer.update
    out = tmp_path / "lat.jsonl"
    latency.main(["--model", llama_dir, "--input-len", "8", "--output-len", "6",
                  "--batch-size", "3", "--num-iters-warmup", "0", "--num-iters", "1",
                  "--profile", "--output-json", str(out)])
    text = capsys.readouterr().out
    (r,) = [json.loads(line) for line in open(out)]
    prof = r["profile"]
    # 3 prompts of 8 tokens fit one step; then one decode step per further token
    assert prof["prefill"]["steps"] == 1 and prof["decode"]["steps"] == 6 - 1
    for kind in ("prefill", "decode"):
        sections = prof[kind]["sections_ms"]
        assert list(sections) == list(SECTIONS)
        assert all(v >= 0 for k, v in sections.items() if k != "gap")
        assert 0 < sections["forward"] < prof[kind]["step_ms"]
    shares = prof["forward_ops"]["shares"]
    assert shares and abs(sum(shares.values()) - 1) < 1e-6 and "GEMM" in shares
    assert "decode steps: 5" in text and "forward by op type" in text
    # the timers are gone afterwards: the class's own methods again
    assert IncrementalDetokenizer.update is original_update


def test_profile_leaves_the_engine_as_it_was(llama_dir):
    from octavo import LLM, SamplingParams
    from octavo.bench.step_profile import op_category, profile_steps

    llm = LLM(llama_dir, kv_cache_memory=1 << 24, dtype="float32")
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=5)
    before = llm.generate(["Hello there", "A"], params, use_tqdm=False)

    def batch(tag):
        for i, p in enumerate(["Hello there", "A"]):
            engine.add_request(f"{tag}-{i}", p, params)
        while engine.has_unfinished_requests():
            engine.step()

    profile_steps(engine, batch)
    runner = engine.executor.runner
    for obj, name in ((engine, "step"), (engine.scheduler, "schedule"), (runner, "prepare"),
                      (runner.model, "forward"), (engine.sampler, "forward")):
        assert name not in vars(obj), name
    after = llm.generate(["Hello there", "A"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]
    assert [op_category(n) for n in ("octavo::paged_attention", "aten::mm",
                                     "octavo::fused_add_rms_norm", "octavo::rotary_embedding",
                                     "octavo::reshape_and_cache", "aten::add")] == \
        ["attention", "GEMM", "norms", "rotary", "cache writes", "other ops"]


def test_weight_memory_counts_each_weight_once(llama_dir):
    from transformers import AutoModelForCausalLM

    from octavo import LLM
    from octavo.bench.utils import engine_weight_bytes
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama_dir).parameters())
    bf16 = engine_weight_bytes(LLM(llama_dir, dtype="bfloat16").llm_engine)
    assert abs(bf16 - 2 * n) <= 0.01 * 2 * n          # packed copies share the weights' storage
    int4 = engine_weight_bytes(LLM(llama_dir, dtype="bfloat16", quantization="int4").llm_engine)
    assert int4 < 0.8 * bf16
