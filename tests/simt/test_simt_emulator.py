"""Self-tests of the SIMT emulator (csrc/simt): each CUDA feature against its documented
semantics, written out here independently of the emulator's code."""
import pytest
import torch

import simt_ext


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def test_syncthreads_orders_shared_memory(simt):
    out = torch.zeros(64, dtype=torch.int32)
    simt.selftest_divergent_sync(out, 0)
    assert out.tolist() == [(i + 1) % 64 for i in range(64)]


@pytest.mark.parametrize("mode,expected", [
    (1, r"48 thread\(s\) exited \[threads 16\.\.63\]; 16 thread\(s\) wait at __syncthreads"),
    (2, r"32 thread\(s\) wait at __syncthreads \(selftest.cu:\d+\).*32 thread\(s\) wait at __syncthreads"),
    (4, r"32 thread\(s\) exited.*32 thread\(s\) wait at __shfl_sync mask 0xffffffff \(selftest.cu:\d+\)"),
])
def test_divergent_syncthreads_is_an_error(simt, mode, expected):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"kernel '[^']*sync_kernel\(int, int\*\)', block \(0,0,0\): deadlock") as e:
        simt.selftest_divergent_sync(out, mode)
    assert __import__("re").search(expected, str(e.value)), str(e.value)


def test_lane_outside_its_mask_is_an_error(simt):
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\): thread \(0,0,0\): __shfl_sync called by "
                       r"lane 0, which is not in its mask 0x00000002 \(selftest.cu:\d+\)"):
        simt.selftest_divergent_sync(torch.zeros(64, dtype=torch.int32), 3)


def shuffle_source(lane: int, kind: int, arg: int, width: int) -> int:
    """The source lane of each shuffle, as the CUDA programming guide describes them."""
    base = lane & ~(width - 1)
    if kind == 0:
        return base + arg % width
    if kind == 1:
        return lane - arg if lane - arg >= base else lane
    if kind == 2:
        return lane + arg if lane + arg < base + width else lane
    return lane ^ arg if (lane ^ arg) < base + width else lane


@pytest.mark.parametrize("kind,arg,width", [
    (0, 5, 32), (0, 37, 8), (1, 3, 32), (1, 2, 8), (2, 1, 16), (2, 5, 32),
    (3, 1, 32), (3, 16, 32), (3, 12, 8)])
def test_shuffles(simt, kind, arg, width):
    x = torch.arange(128, dtype=torch.float32) * 3 + 1
    out = torch.empty_like(x)
    simt.selftest_shuffle(out, x, kind, arg, width)
    expected = [x[t - t % 32 + shuffle_source(t % 32, kind, arg, width)].item() for t in range(128)]
    assert out.tolist() == expected


def test_warp_reduction_is_exact(simt):
    torch.manual_seed(0)
    ints = torch.randint(-1000, 1000, (128,)).float()
    out = torch.empty_like(ints)
    simt.selftest_shuffle(out, ints, 4, 0, 32)
    assert out.tolist() == ints.view(4, 32).sum(1).repeat_interleave(32).tolist()
    # floats: bitwise the butterfly order (r_l += r_{l ^ o} for o = 16, 8, 4, 2, 1)
    x = torch.randn(128)
    simt.selftest_shuffle(out, x, 4, 0, 32)
    r, lanes = x.view(4, 32).clone(), torch.arange(32)
    for o in (16, 8, 4, 2, 1):
        r = r + r[:, lanes ^ o]
    assert torch.equal(out, r.flatten())


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0000FFFF, 0xAAAAAAAA, 0x00000001, 0x80000001, 0x0F0F0F00])
def test_votes_with_partial_masks(simt, mask):
    torch.manual_seed(mask % 97)
    pred = torch.randint(0, 3, (32,), dtype=torch.int32) * torch.randint(0, 2, (32,), dtype=torch.int32)
    out = torch.full((96,), -7, dtype=torch.int32)
    simt.selftest_votes(out, pred, mask)
    for lane in range(32):
        m = mask if mask >> lane & 1 else ~mask & 0xFFFFFFFF
        ballot = sum(1 << j for j in range(32) if m >> j & 1 and pred[j] != 0)
        got = out[3 * lane: 3 * lane + 3].tolist()
        assert [got[0] & 0xFFFFFFFF, got[1], got[2]] == [ballot, int(ballot != 0), int(ballot == m)], lane


def test_shared_memory_is_poisoned_in_every_block(simt):
    out = torch.zeros(3, 2, dtype=torch.int32)
    simt.selftest_shared_poison(out)
    assert (out == -1).all(), out  # 0xFFFFFFFF: static and dynamic shared memory
    assert out.view(torch.float32).isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_m16n8k16_round_trip(simt, dtype):
    torch.manual_seed(0)
    a, b, c = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype), torch.randn(16, 8)
    d = torch.empty(16, 8)
    simt.selftest_mma(d, a, b, c)
    exact = a.double() @ b.double() + c.double()
    torch.testing.assert_close(d.double(), exact, rtol=1e-6, atol=1e-5)
    # one-hot operands pin every fragment position exactly
    eye = torch.eye(16, dtype=dtype)
    simt.selftest_mma(d, eye, b, torch.zeros(16, 8))
    assert torch.equal(d, b.float())
    simt.selftest_mma(d, a, eye[:, :8].contiguous(), torch.zeros(16, 8))
    assert torch.equal(d, a[:, :8].float())
    simt.selftest_mma(d, torch.zeros(16, 16, dtype=dtype), b, c)
    assert torch.equal(d, c)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_layout(simt, num, trans):
    m = torch.arange(256, dtype=torch.int16)
    mats = m.view(4, 8, 8).int()
    out = torch.zeros(32, num, dtype=torch.int32)
    simt.selftest_ldmatrix(out, m, num, trans, True)
    for lane in range(32):
        for j in range(num):
            r, c = lane // 4, 2 * (lane % 4)
            lo, hi = (mats[j, c, r], mats[j, c + 1, r]) if trans else (mats[j, r, c], mats[j, r, c + 1])
            assert out[lane, j].item() & 0xFFFFFFFF == int(lo) | int(hi) << 16, (lane, j)


def test_cp_async_lands_at_the_wait(simt):
    # Reading shared memory before cp.async.wait_group is a race on a GPU; the emulator delays
    # the copies to the wait, so such a read sees the poison.
    out = torch.zeros(32, 4, dtype=torch.int32)
    simt.selftest_ldmatrix(out, torch.arange(256, dtype=torch.int16), 4, False, False)
    assert (out == -1).all()


def test_atomics_under_many_threads(simt):
    blocks, threads = 7, 96
    n = blocks * threads
    ints = torch.tensor([0, -1, 1 << 40, 0, 0], dtype=torch.int64)
    total = torch.zeros(1)
    simt.selftest_atomics(ints, total, blocks, threads)
    assert ints.tolist() == [n, n - 1, 0, n, -1]  # count, max, min, CAS loop, all 64 bits OR-ed
    assert total.item() == 0.5 * n


def test_bad_launch_configuration(simt):
    x = torch.zeros(64)
    with pytest.raises(RuntimeError, match="invalid launch configuration"):
        simt.selftest_shuffle(torch.empty(0), torch.empty(0), 0, 0, 32)
    with pytest.raises(RuntimeError, match="width must be a power of two"):
        simt.selftest_shuffle(torch.empty_like(x), x, 0, 0, 12)
