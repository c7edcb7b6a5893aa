"""LoRA shrink / expand (punica BGMV shape): the references vs a per-token gather in fp64 and a
hand-computed case, then octavo.ops (the CPU kernel) vs the references, rows of mixed slots."""
import pytest
import torch

from kernel_utils import ALL_DTYPES, DTYPES, assert_close_to_ref
from octavo import ops, ops_native


def exact_shrink(x, w, idx, scale):
    """Every row gathers its slot's A and multiplies in fp64; rows without a slot are 0."""
    rows = w.double()[idx.clamp(min=0)]                       # [T, R, K]
    out = scale * torch.einsum("tk,trk->tr", x.double(), rows)
    return out * (idx >= 0).double()[:, None]


def exact_expand(out, x, w, idx, offset):
    rows = w.double()[idx.clamp(min=0)]                       # [T, N, R]
    delta = torch.einsum("tr,tnr->tn", x.double(), rows) * (idx >= 0).double()[:, None]
    res = out.double().clone()
    res[:, offset:offset + w.shape[1]] += delta
    return res


def make(t, k, r, n, slots, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    a = (torch.randn(slots, r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(slots, n, r, generator=g) / r ** 0.5).to(dtype)
    idx = torch.randint(-1, slots, (t,), generator=g)
    return x, a, b, idx


def test_references_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])             # slot 0 takes x0, slot 1 x1
    idx = torch.tensor([1, -1, 0])
    s = ops_native.lora_shrink(x, a, idx, scale=2.0)
    assert s.tolist() == [[4.0], [0.0], [10.0]]
    b = torch.tensor([[[1.0], [10.0]], [[-1.0], [0.5]]])        # [L=2, N=2, R=1]
    out = torch.zeros(3, 4)
    ops_native.lora_expand(out, s, b, idx, offset=1)
    assert out.tolist() == [[0, -4.0, 2.0, 0], [0, 0, 0, 0], [0, 10.0, 100.0, 0]]


@pytest.mark.parametrize("t,k,r,n", [(1, 64, 8, 96), (7, 769, 16, 130), (33, 128, 64, 5)])
def test_references_vs_gather(t, k, r, n):
    x, a, b, idx = make(t, k, r, n, 3, torch.float64)
    torch.testing.assert_close(ops_native.lora_shrink(x, a, idx, 0.5).double(),
                               exact_shrink(x, a, idx, 0.5), rtol=1e-5, atol=1e-5)
    s = exact_shrink(x, a, idx, 0.5).float()
    out = torch.randn(t, n + 7, dtype=torch.float64)
    ref = exact_expand(out, s, b, idx, 3)
    ops_native.lora_expand(out, s, b, idx, 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("t,k,r,slots", [(0, 64, 8, 2), (1, 64, 8, 1), (5, 769, 16, 3),
                                         (40, 128, 64, 4), (17, 5125, 8, 2)])
def test_shrink_matches_reference(dtype, t, k, r, slots):
    x, a, _, idx = make(t, k, r, 4, slots, dtype, seed=t + k)
    out = ops.lora_shrink(x, a, idx, 0.25)
    assert out.dtype == torch.float32 and out.shape == (t, r)
    native = ops_native.lora_shrink(x, a, idx, 0.25)
    assert_close_to_ref(out, native, exact_shrink(x, a, idx, 0.25), what=f"shrink {dtype}")
    if t:
        assert (out[idx < 0] == 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("t,r,n,offset,slots", [(0, 8, 16, 0, 2), (1, 8, 96, 0, 1),
                                                (6, 16, 130, 17, 3), (40, 64, 769, 5, 4)])
def test_expand_matches_reference(dtype, t, r, n, offset, slots):
    x, _, b, idx = make(t, 8, r, n, slots, dtype, seed=t + n)
    s = torch.randn(t, r)
    base = torch.randn(t, offset + n + 3).to(dtype)
    exact = exact_expand(base, s, b, idx, offset)
    native = base.clone()
    ops_native.lora_expand(native, s, b, idx, offset)
    out = base.clone()
    ops.lora_expand(out, s, b, idx, offset)
    assert_close_to_ref(out, native, exact, what=f"expand {dtype}")
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[offset:offset + n] = False
    assert torch.equal(out[:, untouched], base[:, untouched])
    if t:
        assert torch.equal(out[idx < 0], base[idx < 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    """x and out as row views of wider buffers (a projection's slice of a fused output)."""
    x_full, a, b, idx = make(9, 200, 16, 48, 3, dtype, seed=3)
    x = x_full[:, 10:170]
    a = a[:, :, :160].contiguous()
    s_full = torch.zeros(9, 40)
    s = s_full[:, 8:24]
    s.copy_(ops.lora_shrink(x, a, idx))
    assert_close_to_ref(s, ops_native.lora_shrink(x, a, idx), exact_shrink(x, a, idx, 1.0))
    out_full = torch.randn(9, 100).to(dtype)
    out = out_full[:, 20:90]
    exact = exact_expand(out, s, b, idx, 11)
    native = out.clone()
    ops_native.lora_expand(native, s, b, idx, 11)
    ops.lora_expand(out, s, b, idx, 11)
    assert_close_to_ref(out, native, exact)


def test_bad_arguments_raise():
    x, a, b, idx = make(4, 32, 8, 16, 2, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="indices"):
        ops.lora_shrink(x, a, torch.tensor([0, 1, 2, -1]))          # slot 2 of 2
    with pytest.raises((RuntimeError, ValueError), match="float32"):
        ops.lora_expand(torch.zeros(4, 16), torch.zeros(4, 8, dtype=torch.bfloat16), b, idx)
    with pytest.raises((RuntimeError, ValueError), match="outside"):
        ops.lora_expand(torch.zeros(4, 16), torch.zeros(4, 8), b, idx, offset=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, a, b, idx = make(5, 64, 8, 24, 3, dtype)
    s = torch.empty(5, 8)
    torch.library.opcheck(torch.ops.octavo.lora_shrink.default, (s, x, a, idx, 0.5))
    torch.library.opcheck(torch.ops.octavo.lora_expand.default,
                          (torch.zeros(5, 30, dtype=dtype), torch.randn(5, 8), b, idx, 2))
