"""The cold-start suite times fresh processes and reports each case against the torch floor."""
from __future__ import annotations

import argparse
import json
import statistics

import pytest

from octavo.bench import startup


def _args(**kw):
    parser = argparse.ArgumentParser()
    startup.add_args(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_startup_suite_on_a_tiny_model(llama_dir, tmp_path):
    out = tmp_path / "startup.jsonl"
    rows = startup.run(_args(model=llama_dir, runs=1, cases="torch,llm,generate,serve",
                             output=str(out)))
    by_case = {r["case"]: r for r in rows}
    assert list(by_case) == ["torch", "llm", "generate", "serve"]
    floor = by_case["torch"]["median_s"]
    for row in rows:
        assert row["median_s"] == statistics.median(row["runs_s"]) > 0
        assert row["ratio_to_torch_import"] == pytest.approx(row["median_s"] / floor)
    # LLM() and generate stand on the torch import: neither can be quicker than it
    assert by_case["llm"]["median_s"] > floor and by_case["generate"]["median_s"] > floor
    assert [json.loads(line)["case"] for line in out.read_text().splitlines()] == list(by_case)


def test_startup_suite_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown case"):
        startup.run(_args(cases="torch,warp"))
    with pytest.raises(ValueError, match="--runs"):
        startup.run(_args(runs=0))
