"""`python -m octavo.bench.cli SUITE` and `octavo bench SUITE` reach the suites."""
import json
import subprocess
import sys

from test_bench_plot import RECORDS


def test_bench_cli_module_runs_plot(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    res = subprocess.run([sys.executable, "-m", "octavo.bench.cli", "plot", str(src), "-o",
                          str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "f.png").exists()


def test_octavo_bench_subcommand(tmp_path):
    res = subprocess.run([sys.executable, "-m", "octavo.entrypoints.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for suite in ("throughput", "latency", "serve", "plot"):
        assert suite in res.stdout
