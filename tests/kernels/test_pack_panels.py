"""ops.pack_linear_panels (the C++ repacking done once at load) vs ops_native.pack_linear_panels,
the layout's definition: every dtype it takes, padded panels and odd K, row-strided weights, and
each CPU variant it is built for."""
import os
import subprocess
import sys

import pytest
import torch

from octavo import ops, ops_native

SHAPES = [(1, 1), (63, 5), (64, 2), (65, 33), (130, 129), (200, 1024), (70, 0), (0, 8)]  # (N, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_matches_reference(dtype, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    ref = ops_native.pack_linear_panels(w)
    out = ops.pack_linear_panels(w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref)
    if n and k:
        assert torch.equal(ops_native.unpack_linear_panels(out, n, k), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_row_strided_view(dtype):
    # a slice of a wider tensor (odd row stride: rows are not pair-aligned in memory)
    base = torch.randn(97, 301).to(dtype)
    w = base[:, 3:260]
    assert w.stride(0) == 301
    assert torch.equal(ops.pack_linear_panels(w), ops_native.pack_linear_panels(w.contiguous()))


def test_pack_rejects_bad_out():
    w = torch.randn(65, 10, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        torch.ops.octavo.pack_linear_panels(torch.empty(1, 5, 64, 2, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.octavo.pack_linear_panels(torch.empty(2, 5, 64, 2), w)


VARIANT_SCRIPT = """
import torch
from octavo import ops, ops_native
for dtype in (torch.bfloat16, torch.float32):
    for n, k in ((130, 129), (64, 2), (200, 1024)):
        w = torch.randn(n, k).to(dtype)
        assert torch.equal(ops.pack_linear_panels(w), ops_native.pack_linear_panels(w)), (dtype, n, k)
print("ok")
"""


@pytest.mark.skipif(ops.USING_NATIVE, reason="the C++ extension is not loaded (OCTAVO_USE_NATIVE_OPS)")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_pack_variant(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
