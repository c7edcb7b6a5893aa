"""octavo bench plot turns JSON-lines results of every suite into a PNG."""
import json

import pytest

from octavo.bench import plot

RECORDS = [
    {"suite": "throughput", "backend": "octavo", "model": "m", "engine": {"max_num_seqs": 8},
     "output_tokens_per_second": 100.0},
    {"suite": "throughput", "backend": "octavo", "model": "m", "engine": {"max_num_seqs": 32},
     "output_tokens_per_second": 300.0},
    {"suite": "throughput", "backend": "hf", "model": "m", "engine": {}, "hf_max_batch_size": 32,
     "output_tokens_per_second": 90.0},
    {"suite": "latency", "batch_size": 1, "percentiles": {"10": 0.1, "50": 0.2, "99": 0.3}},
    {"suite": "latency", "batch_size": 8, "percentiles": {"10": 0.4, "50": 0.5, "99": 0.9}},
    {"suite": "serve", "request_rate": "2.0", "output_throughput": 50.0, "median_ttft_ms": 20.0},
    {"suite": "serve", "request_rate": "inf", "output_throughput": 80.0, "median_ttft_ms": 90.0},
]


def test_plot_writes_png(tmp_path, capsys):
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "fig.png"
    plot.main([str(src), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "throughput, latency, serve" in capsys.readouterr().out


def test_plot_rejects_files_without_results(tmp_path, capsys):
    src = tmp_path / "r.jsonl"
    src.write_text('{"suite": "other"}\n')
    with pytest.raises(SystemExit):
        plot.main([str(src), "-o", str(tmp_path / "x.png")])
    assert "no throughput, latency or serve records" in capsys.readouterr().err
