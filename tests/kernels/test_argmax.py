"""ops.argmax_rows (greedy sampling's argmax, csrc/cpu/argmax.cpp) against torch.argmax, which
it must equal exactly: ties keep the first index, a NaN wins (the first one), all -inf rows give
0; vocabularies that are not a multiple of the vector width, rows with a stride, and the inputs
the kernel hands back to torch (bf16, a non-unit last stride) go through the same check."""
from __future__ import annotations

import pytest
import torch

from octavo import ops


@pytest.mark.parametrize("v", [1, 7, 16, 17, 31, 1000, 32000])
@pytest.mark.parametrize("n", [1, 3, 32])
def test_random_rows(n, v):
    x = torch.randn(n, v, generator=torch.Generator().manual_seed(n * 100003 + v))
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))


def test_ties_nan_inf_and_signed_zero():
    v = 53
    x = torch.randn(8, v, generator=torch.Generator().manual_seed(0))
    x[0, 5] = x[0, 40] = 100.0                       # a tie: the first index
    x[1, 3] = x[1, 19] = x[1, 50] = 7.0
    x[1] = torch.clamp(x[1], max=7.0)
    x[2, 30] = float("nan")                          # a NaN beats everything
    x[3, 20] = float("nan")
    x[3, 9] = float("nan")                           # the first NaN
    x[4] = float("-inf")                             # all -inf: 0
    x[5] = -1.0
    x[5, 33] = float("inf")
    x[6] = -5.0
    x[6, 11], x[6, 2] = 0.0, -0.0                    # +0 and -0 compare equal: the first
    x[7, v - 1] = 50.0                               # the maximum in the scalar tail
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert ops.argmax_rows(x).tolist()[:3] == [5, 3, 30]   # hand-checked


def test_strided_rows_and_fallbacks():
    big = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    rows = big[:, 10:250]                            # row stride 300, unit last stride
    assert torch.equal(ops.argmax_rows(rows), rows.argmax(dim=-1))
    cols = big.t()[:, :50]                           # last stride 300: torch's argmax
    assert torch.equal(ops.argmax_rows(cols), cols.argmax(dim=-1))
    b16 = big.to(torch.bfloat16)
    assert torch.equal(ops.argmax_rows(b16), b16.argmax(dim=-1))
    assert ops.argmax_rows(torch.empty(0, 9)).shape == (0,)
