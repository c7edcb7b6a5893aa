"""The csrc/cuda LoRA kernels (shrink: a warp per rank row; expand: a thread per output column)
under the SIMT emulator (torch.ops.octavo_simt.lora_*) against octavo.ops_native, tolerances as
tests/kernels/test_lora_ops.py."""
import pytest
import torch

import simt_ext
from kernel_utils import assert_close_to_ref
from octavo import ops_native
from test_lora_ops import exact_expand, exact_shrink, make


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,r,slots", [(0, 32, 8, 2), (1, 64, 8, 1), (5, 77, 16, 3),
                                         (9, 130, 5, 2)])
def test_lora_shrink(simt, dtype, t, k, r, slots):
    x, a, _, idx = make(t, k, r, 4, slots, dtype, seed=t + k)
    out = torch.full((t, r), float("nan"))
    simt.lora_shrink(out, x, a, idx, 0.5)
    assert_close_to_ref(out, ops_native.lora_shrink(x, a, idx, 0.5), exact_shrink(x, a, idx, 0.5),
                        what=f"shrink {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,r,n,offset,slots", [(0, 8, 16, 0, 2), (1, 8, 40, 0, 1),
                                                (6, 16, 130, 17, 3), (4, 3, 200, 5, 2)])
def test_lora_expand(simt, dtype, t, r, n, offset, slots):
    _, _, b, idx = make(t, 8, r, n, slots, dtype, seed=t + n)
    s = torch.randn(t, r)
    base = torch.randn(t, offset + n + 3).to(dtype)
    native = base.clone()
    ops_native.lora_expand(native, s, b, idx, offset)
    out = base.clone()
    simt.lora_expand(out, s, b, idx, offset)
    assert_close_to_ref(out, native, exact_expand(base, s, b, idx, offset), what=f"expand {dtype}")
    if t:
        assert torch.equal(out[idx < 0], base[idx < 0])


def test_strided_views_and_out_of_range_slots(simt):
    """Row views of wider buffers; a slot index past the stacked weights means no adapter (the
    kernels never read indices on the host)."""
    x_full, a, b, idx = make(7, 96, 8, 24, 2, torch.bfloat16, seed=9)
    x = x_full[:, 10:80]
    a = a[:, :, :70].contiguous()
    idx[3] = 5                                    # outside [0, 2)
    s_full = torch.full((7, 20), float("nan"))
    s = s_full[:, 4:12]
    simt.lora_shrink(s, x, a, idx, 1.0)
    ref_idx = idx.clone()
    ref_idx[3] = -1
    assert_close_to_ref(s, ops_native.lora_shrink(x, a, ref_idx), exact_shrink(x, a, ref_idx, 1.0))
    out_full = torch.randn(7, 60).to(torch.bfloat16)
    out = out_full[:, 9:40]
    base = out.clone()
    simt.lora_expand(out, s, b, idx, 2)
    native = base.clone()
    ops_native.lora_expand(native, s, b, ref_idx, 2)
    assert_close_to_ref(out, native, exact_expand(base, s, b, ref_idx, 2))
    assert torch.equal(out[3], base[3])
