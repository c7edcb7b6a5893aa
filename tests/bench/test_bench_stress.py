"""`python -m octavo.bench.stress` (the long reliability mode's entry point) runs end to end on
the tiny model, small: one server (a cache of 17 blocks), a few streams, a few fuzz bodies."""
import json
import os
import subprocess
import sys


def test_bench_stress_runs(chat_model_dir, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "octavo.bench.stress", "--model", chat_model_dir,
         "--streams", "12", "--fuzz-per-endpoint", "25", "--vocab-size", "500",
         "--small-kv-cache", "136KiB", "--output-json", str(tmp_path / "r.jsonl")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "streams: {'streams': 12" in out and "0 failure(s)" in out
    assert "fuzz: {'sent': 115" in out
    assert "free KV blocks" in out and "running 0, waiting 0" in out
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["failures"] == 0 and record["fuzz"]["sent"] == 115
    assert record["streams"]["aborted"] + record["streams"]["completed"] == 12
    assert record["kv_exhaustion"]["preemptions"] > 0
