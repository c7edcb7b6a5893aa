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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(64, 2), (128, 768), (192, 5632), (640, 130)])
def test_pack_in_place(dtype, n, k):
    # the packed panels overwrite the weight's own memory: the same bytes as a packed copy
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    ref = ops_native.pack_linear_panels(w)
    ptr = w.data_ptr()
    assert ops.can_pack_in_place(w)
    out = ops.pack_linear_panels(w, in_place=True)
    assert out.data_ptr() == ptr and torch.equal(out, ref)


def test_pack_in_place_only_where_it_fits():
    # padding (N off 64, odd K), a view into a larger storage, a strided weight: a packed copy,
    # the weight untouched
    base = torch.randn(128, 64, dtype=torch.bfloat16)
    for w in (torch.randn(65, 64, dtype=torch.bfloat16), torch.randn(64, 63, dtype=torch.bfloat16),
              base[:64], base.t()[:, :64].t(), base[:, :32]):
        assert not ops.can_pack_in_place(w)
        before = w.clone()
        out = ops.pack_linear_panels(w, in_place=True)
        assert out.data_ptr() != w.data_ptr() and torch.equal(w, before)
        assert torch.equal(out, ops_native.pack_linear_panels(before))
    base = torch.randn(640, dtype=torch.bfloat16)       # out aliasing a weight of odd K: refused
    with pytest.raises(RuntimeError, match="packing in place"):
        torch.ops.octavo.pack_linear_panels(base.view(1, 5, 64, 2), base[:576].view(64, 9))


VARIANT_SCRIPT = """
import torch
from octavo import ops, ops_native
for dtype in (torch.bfloat16, torch.float32):
    for n, k in ((130, 129), (64, 2), (200, 1024)):
        w = torch.randn(n, k).to(dtype)
        assert torch.equal(ops.pack_linear_panels(w), ops_native.pack_linear_panels(w)), (dtype, n, k)
        if n % 64 == 0 and k % 2 == 0:
            ref = ops_native.pack_linear_panels(w)
            assert torch.equal(ops.pack_linear_panels(w, in_place=True), ref), (dtype, n, k)
print("ok")
"""


@pytest.mark.skipif(ops.USING_NATIVE, reason="the C++ extension is not loaded (OCTAVO_USE_NATIVE_OPS)")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_pack_variant(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
