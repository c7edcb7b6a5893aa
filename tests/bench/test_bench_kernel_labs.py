"""The kernel labs added by the bench issue run end to end in --quick mode."""
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("lab", ["activation", "rotary_embedding", "reshape_and_cache", "decode_gemms"])
def test_lab_quick(lab):
    res = subprocess.run([sys.executable, "-m", f"octavo.bench.kernels.{lab}", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and "OK" in res.stdout
    assert re.search(r"copy bandwidth [\d.]+ GB/s", res.stdout)
    assert re.search(r"[\d.]+ GB/s \(\s*\d+% of copy\)", res.stdout)
