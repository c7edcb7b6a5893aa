"""Plot bench results (JSON lines from --output-json) into one PNG.

python -m octavo.bench.plot results.jsonl [more.jsonl ...] -o fig.png
Panels, one per suite present: throughput (output tokens/s per backend vs max_num_seqs for
octavo, vs --hf-max-batch-size for transformers), latency percentiles vs batch size, and
serving output throughput and median TTFT vs request rate.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Any


def load(paths: list[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not a JSON line: {e}") from e
    return records


def _median_by(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Repeated runs of one setting are drawn as their median."""
    import numpy as np
    groups: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        groups[x].append(y)
    xs = sorted(groups)
    return xs, [float(np.median(groups[x])) for x in xs]


def plot_throughput(ax, recs):
    lines = defaultdict(list)
    models = {r["model"] for r in recs}
    for r in recs:
        x = r.get("hf_max_batch_size") if r["backend"] == "hf" else r["engine"].get("max_num_seqs", 256)
        label = r["backend"] if len(models) == 1 else f"{r['backend']} {os.path.basename(r['model'])}"
        lines[label].append((x, r["output_tokens_per_second"]))
    for backend, pts in sorted(lines.items()):
        xs, ys = _median_by(pts)
        ax.plot(xs, ys, "o-", label=backend)
    ax.set(title="offline throughput", xlabel="batch size (max_num_seqs / hf batch)",
           ylabel="output tokens/s")
    ax.legend()


def plot_latency(ax, recs):
    by_p = defaultdict(list)
    for r in recs:
        for p, v in r["percentiles"].items():
            by_p[p].append((r["batch_size"], v))
    for p in sorted(by_p, key=float):
        xs, ys = _median_by(by_p[p])
        ax.plot(xs, ys, "o-", label=f"p{p}")
    ax.set(title="batch latency percentiles", xlabel="batch size", ylabel="seconds")
    ax.legend(fontsize="small")


def plot_serve(ax, recs):
    pts, ttft = [], []
    finite = [float(r["request_rate"]) for r in recs if r["request_rate"] != "inf"]
    inf_x = (max(finite) * 2) if finite else 1.0      # "inf" drawn right of the largest rate
    for r in recs:
        x = inf_x if r["request_rate"] == "inf" else float(r["request_rate"])
        pts.append((x, r["output_throughput"]))
        ttft.append((x, r["median_ttft_ms"]))
    xs, ys = _median_by(pts)
    ax.plot(xs, ys, "o-", color="C0", label="output tok/s")
    ax.set(title="serving", xlabel="request rate (req/s; inf is drawn at 2x the largest rate)",
           ylabel="output tokens/s")
    ax2 = ax.twinx()
    xs, ys = _median_by(ttft)
    ax2.plot(xs, ys, "s--", color="C1", label="median TTFT")
    ax2.set_ylabel("median TTFT (ms)")
    ax.legend(loc="upper left", fontsize="small")
    ax2.legend(loc="lower right", fontsize="small")


PANELS = {"throughput": plot_throughput, "latency": plot_latency, "serve": plot_serve}


def plot(records: list[dict[str, Any]], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in PANELS if any(r.get("suite") == s for r in records)]
    if not suites:
        raise ValueError("no throughput, latency or serve records in the input files")
    fig, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4.2), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        PANELS[suite](ax, [r for r in records if r.get("suite") == suite])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return suites


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="JSON-lines result files")
    p.add_argument("-o", "--output", default="bench.png", help="PNG to write")


def run(args: argparse.Namespace) -> None:
    suites = plot(load(args.inputs), args.output)
    print(f"wrote {args.output} ({', '.join(suites)})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
