"""octavo bench throughput on the tiny Llama: printed and JSON fields, token counts, the ratio."""
import json
import re

import pytest

from octavo.bench import throughput
from octavo.bench.datasets import SampleRequest

LINE = re.compile(r"\[(\w+)\] Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, "
                  r"([\d.]+) output tokens/s")


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_both_backends_count_requested_tokens_and_print_ratio(llama_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    throughput.main(["--model", llama_dir, "--backend", "both", "--num-prompts", "5",
                     "--input-len", "9", "--output-len", "6", "--hf-max-batch-size", "2",
                     "--max-num-seqs", "4", "--output-json", str(out)])
    text = capsys.readouterr().out
    printed = {m.group(1): [float(x) for x in m.groups()[1:]] for m in LINE.finditer(text)}
    assert set(printed) == {"octavo", "hf"}
    assert "[octavo] Total num prompt tokens:  45" in text
    assert "[hf] Total num output tokens:  30" in text
    recs = _records(out)
    assert [r["backend"] for r in recs] == ["octavo", "hf"]
    for r in recs:
        assert r["total_prompt_tokens"] == 5 * 9 and r["total_output_tokens"] == 5 * 6
        assert r["num_requests"] == 5 and r["elapsed_time"] > 0
        assert r["output_tokens_per_second"] == pytest.approx(30 / r["elapsed_time"])
        assert r["tokens_per_second"] == pytest.approx(75 / r["elapsed_time"])
        assert printed[r["backend"]][2] == pytest.approx(r["output_tokens_per_second"], abs=0.01)
        assert r["machine"]["cores"] >= 1 and r["suite"] == "throughput"
    ratio = recs[0]["output_tokens_per_second"] / recs[1]["output_tokens_per_second"]
    assert recs[0]["ratio_vs_hf"] == pytest.approx(ratio)
    assert f"Ratio octavo/hf output tokens/s: {ratio:.2f}x" in text
    assert recs[0]["engine"]["max_num_seqs"] == 4


def test_n_and_prefix_repetition(llama_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    throughput.main(["--model", llama_dir, "--num-prompts", "4", "--dataset", "prefix-repetition",
                     "--prefix-len", "16", "--num-prefixes", "2", "--input-len", "5",
                     "--output-len", "3", "--n", "2", "--output-json", str(out)])
    (rec,) = _records(out)
    assert rec["total_prompt_tokens"] == 4 * (16 + 5)
    assert rec["total_output_tokens"] == 4 * 2 * 3


def test_hf_batches_respect_size_and_length_limits():
    reqs = [SampleRequest([1] * n, o) for n, o in [(4, 4), (4, 4), (4, 4), (1000, 1000), (60, 1)]]
    batches = list(throughput.hf_batches(reqs, max_batch=2, max_len=1100))
    assert [len(b) for b in batches] == [2, 1, 1, 1]
    assert sum(len(b) for b in batches) == len(reqs)


def test_bad_arguments_exit_with_a_message(llama_dir, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--model", llama_dir, "--dataset", "sharegpt-json"])
    assert "--dataset-path" in capsys.readouterr().err
