"""The mamba-130m bench preset: its size counted by hand, and the throughput (octavo vs
transformers), latency and decode_ceiling suites run end to end on a small model of the same
kind written by make_random_model."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from octavo.bench import decode_ceiling, latency, make_random_model, throughput

PRESET = "mamba-130m"


def test_mamba_130m_preset_size_by_hand():
    """state-spaces/mamba-130m: per layer in_proj 768 -> 2 x 1536, depthwise conv (width 4, bias),
    x_proj 1536 -> dt rank 48 + B 16 + C 16, dt_proj 48 -> 1536 (bias), A_log 1536 x 16, D, out_proj
    1536 -> 768, one norm; a tied 50280 x 768 embedding and the final norm."""
    fields = dict(make_random_model.PRESETS[PRESET])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    h, d, n, r, v = 768, 1536, 16, 48, 50280
    layer = h * 2 * d + d * 4 + d + d * (r + 2 * n) + r * d + d + d * n + d + d * h + h
    assert sum(p.numel() for p in model.parameters()) == 24 * layer + v * h + h == 129_135_360
    assert type(model).__name__ == "MambaForCausalLM" and config.tie_word_embeddings


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    """make_random_model's mamba preset shrunk (hidden 64, 2 layers, vocab 1000), in bf16."""
    small = dict(make_random_model.PRESETS[PRESET], hidden_size=64, num_hidden_layers=2,
                 time_step_rank=4, vocab_size=1000)
    out = str(tmp_path_factory.mktemp("mamba_bench"))
    presets = make_random_model.PRESETS
    make_random_model.PRESETS = {**presets, "mamba-small": small}
    try:
        make_random_model.make_random_model(out, "mamba-small")
    finally:
        make_random_model.PRESETS = presets
    return out


def test_throughput_octavo_vs_transformers(mamba_dir, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    throughput.main(["--model", mamba_dir, "--backend", "both", "--dtype", "bfloat16",
                     "--num-prompts", "4", "--input-len", "12", "--output-len", "5",
                     "--hf-max-batch-size", "4", "--kv-cache-memory", str(1 << 24),
                     "--output-json", str(out)])
    text = capsys.readouterr().out
    recs = [json.loads(line) for line in open(out)]
    assert [r["backend"] for r in recs] == ["octavo", "hf"]
    for r in recs:
        assert r["total_prompt_tokens"] == 4 * 12 and r["total_output_tokens"] == 4 * 5
    assert "Ratio octavo/hf output tokens/s" in text


@pytest.mark.parametrize("input_len", [7, 40])
def test_batch1_latency(mamba_dir, tmp_path, input_len):
    out = tmp_path / "l.jsonl"
    latency.main(["--model", mamba_dir, "--dtype", "bfloat16", "--batch-size", "1",
                  "--input-len", str(input_len), "--output-len", "6", "--num-iters-warmup", "1",
                  "--num-iters", "2", "--kv-cache-memory", str(1 << 24),
                  "--output-json", str(out)])
    (r,) = [json.loads(line) for line in open(out)]
    assert (r["input_len"], r["batch_size"], len(r["latencies"])) == (input_len, 1, 2)
    assert 0 < r["avg_ttft"] < r["avg_latency"] and 0 < r["avg_tpot"] * 5 < r["avg_latency"]


def test_decode_ceiling_both_backends(mamba_dir, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    decode_ceiling.main(["--model", mamba_dir, "--dtype", "bfloat16", "--input-len", "9",
                         "--output-len", "4", "--num-iters", "1",
                         "--kv-cache-memory", str(1 << 24), "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert "octavo batch-1 TPOT" in printed and "transformers batch-1 TPOT" in printed
    record = json.loads(out.read_text())
    assert record["octavo_tpot"] > 0 and record["hf_tpot"] > 0
    assert record["total_params"] == record["active_params"]    # tied embedding, no experts
