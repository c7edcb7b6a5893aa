"""The kernel labs (bench/kernels) run end to end in --quick mode (STYLE habit 15)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("lab", ["linear", "paged_attention", "rms_norm", "mla_attention", "lora", "int4_gemm", "selective_scan", "fp8_gemm", "int8_gemm", "ssd_scan", "gated_delta_rule", "rejection"])
def test_lab_quick(lab):
    res = subprocess.run([sys.executable, "-m", f"octavo.bench.kernels.{lab}", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "GB/s" in res.stdout and "FAIL" not in res.stdout


def test_paged_attention_lab_fp8_cache():
    # the lab's fp8 KV cache (kv_cache_dtype="fp8"): checked against the reference, then timed
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.paged_attention", "--quick",
                          "--dtype", "bfloat16", "--kv-cache-dtype", "fp8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "kv_cache=fp8" in res.stdout and "GB/s" in res.stdout and "FAIL" not in res.stdout


def test_paged_attention_lab_decode_only():
    # --prefill 0 times the decode cases alone (it used to fail building an empty prefill case)
    res = subprocess.run([sys.executable, "-m", "octavo.bench.kernels.paged_attention", "--batch", "4",
                          "--context", "64", "--prefill", "0", "--repeats", "2", "--heads", "4",
                          "--kv-heads", "2", "--head-size", "64"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "decode b=4 ctx=64" in res.stdout and "FAIL" not in res.stdout
    assert "prefill" not in res.stdout.split("copy bandwidth")[1]
