"""octavo bench latency on the tiny Llama: percentiles ordered, TTFT/TPOT consistent."""
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


def test_latency_rejects_bad_sizes(llama_dir, capsys):
    with pytest.raises(SystemExit):
        latency.main(["--model", llama_dir, "--batch-size", "0"])
    assert "--batch-size must be positive" in capsys.readouterr().err
