"""Mamba-1 ops (causal_conv1d[_update], selective_scan, selective_state_update): the references
vs independent computations (F.conv1d, transformers' MambaMixer), then octavo.ops vs the
references on varlen batches mixing prefill chunks, decode rows and padding."""
import pytest
import torch
import torch.nn.functional as F

from kernel_utils import DTYPES, assert_close_to_ref
from octavo import ops, ops_native


def qsl(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


# ---- references vs independent computations ------------------------------------------------

@pytest.mark.parametrize("act", [None, "silu"])
def test_causal_conv1d_reference_matches_padded_conv1d(act):
    g = torch.Generator().manual_seed(0)
    d, w, lens = 6, 4, [5, 1, 2, 9]
    x = torch.randn(sum(lens), d, generator=g, dtype=torch.float64)
    weight = torch.randn(d, w, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    states = torch.randn(6, d, w - 1, generator=g, dtype=torch.float64)
    before = states.clone()
    slots = torch.tensor([4, 0, 2, 5], dtype=torch.int32)
    out = ops_native.causal_conv1d(x, weight, bias, states, qsl(lens), slots,
                                   torch.zeros(4, dtype=torch.bool), act)
    q = qsl(lens).tolist()
    for b, slot in enumerate(slots.tolist()):
        xs = x[q[b]:q[b + 1]].t()[None]                                    # [1, D, L]
        ref = F.conv1d(F.pad(xs, (w - 1, 0)), weight[:, None], bias, groups=d)[0].t()
        torch.testing.assert_close(out[q[b]:q[b + 1]], ref if act is None else F.silu(ref))
        tail = F.pad(xs, (w - 1, 0))[0, :, -(w - 1):]                      # zeros then inputs
        torch.testing.assert_close(states[slot], tail)
    untouched = [1, 3]
    assert torch.equal(states[untouched], before[untouched])


def test_causal_conv1d_reference_reads_initial_state():
    g = torch.Generator().manual_seed(1)
    d, w = 3, 4
    hist = torch.randn(7, d, generator=g, dtype=torch.float64)              # a sequence's past
    x = torch.randn(2, d, generator=g, dtype=torch.float64)
    weight = torch.randn(d, w, generator=g, dtype=torch.float64)
    states = torch.zeros(1, d, w - 1, dtype=torch.float64)
    states[0] = hist[-(w - 1):].t()
    out = ops_native.causal_conv1d(x, weight, None, states, qsl([2]),
                                   torch.tensor([0], dtype=torch.int32), None, None)
    full = torch.cat([hist, x]).t()[None]
    ref = F.conv1d(full, weight[:, None], groups=d)[0].t()[-2:]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(states[0], torch.cat([hist, x])[-(w - 1):].t())


def _tiny_mixer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer
    cfg = transformers.MambaConfig(hidden_size=12, state_size=5, conv_kernel=4, expand=2,
                                   time_step_rank=3, use_conv_bias=True, use_bias=False,
                                   num_hidden_layers=1, vocab_size=10)
    torch.manual_seed(0)
    mixer = MambaMixer(cfg, 0).eval().double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer


def _octavo_mixer(mixer, hs, conv_states, ssm_states, lens, slots, init):
    """The Mamba block of `mixer` on a flat varlen batch through the ops_native references."""
    i, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    q = qsl(lens)
    xz = mixer.in_proj(hs)
    x, gate = xz[:, :i], xz[:, i:]
    x = ops_native.causal_conv1d(x, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, conv_states,
                                 q, slots, init, "silu")
    dt, B, C = torch.split(mixer.x_proj(x), [r, n, n], dim=-1)
    dt = dt @ mixer.dt_proj.weight.t()
    A = -torch.exp(mixer.A_log)
    y = ops_native.selective_scan(x, dt, A, B, C, mixer.D, gate, mixer.dt_proj.bias, True,
                                  ssm_states, q, slots, init)
    return mixer.out_proj(y)


@torch.no_grad()
def test_selective_scan_reference_matches_transformers_mamba_mixer():
    mixer = _tiny_mixer()
    i, n, w = mixer.intermediate_size, mixer.ssm_state_size, mixer.conv_kernel_size
    lens = [7, 1, 3]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randn(L, mixer.hidden_size, generator=g, dtype=torch.float64) for L in lens]
    conv_states = torch.zeros(4, i, w - 1, dtype=torch.float64)
    ssm_states = torch.zeros(4, i, n, dtype=torch.float64)
    slots = torch.tensor([3, 0, 1], dtype=torch.int32)
    out = _octavo_mixer(mixer, torch.cat(seqs), conv_states, ssm_states, lens, slots,
                        torch.zeros(3, dtype=torch.bool))
    q = qsl(lens).tolist()
    for b, s in enumerate(seqs):
        ref = mixer(s[None])[0]
        torch.testing.assert_close(out[q[b]:q[b + 1]], ref)
    # the whole first sequence equals its first 4 tokens, then 2, then 1 decode step carried in
    # the slots (prefill chunks through the scan, the decode step through the update ops)
    s = seqs[0]
    cs = torch.zeros(1, i, w - 1, dtype=torch.float64)
    ss = torch.zeros(1, i, n, dtype=torch.float64)
    zero = torch.tensor([0], dtype=torch.int32)
    parts = [_octavo_mixer(mixer, s[:4], cs, ss, [4], zero, torch.tensor([False])),
             _octavo_mixer(mixer, s[4:6], cs, ss, [2], zero, torch.tensor([True]))]
    xz = mixer.in_proj(s[6:])
    x = ops_native.causal_conv1d_update(xz[:, :i], cs, mixer.conv1d.weight[:, 0],
                                        mixer.conv1d.bias, zero, "silu")
    dt, B, C = torch.split(mixer.x_proj(x), [mixer.time_step_rank, n, n], dim=-1)
    y = ops_native.selective_state_update(ss, x, dt @ mixer.dt_proj.weight.t(),
                                          -torch.exp(mixer.A_log), B, C, mixer.D, xz[:, i:],
                                          mixer.dt_proj.bias, True, zero)
    parts.append(mixer.out_proj(y))
    torch.testing.assert_close(torch.cat(parts), mixer(s[None])[0])
    torch.testing.assert_close(ss[0], ssm_states[3])
    torch.testing.assert_close(cs[0], conv_states[3])


def test_reference_argument_errors():
    x = torch.randn(5, 4)
    states = torch.zeros(2, 4, 3)
    q, slots = qsl([5]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="activation"):
        ops_native.causal_conv1d(x, torch.randn(4, 4), None, states, q, slots, None, "relu")
    with pytest.raises(ValueError, match="conv_states"):
        ops_native.causal_conv1d(x, torch.randn(4, 3), None, states, q, slots, None)
    with pytest.raises(ValueError, match="query_start_loc"):
        ops_native.causal_conv1d(x, torch.randn(4, 4), None, states, qsl([4]), slots, None)
    with pytest.raises(ValueError, match="state_indices"):
        ops_native.causal_conv1d(x, torch.randn(4, 4), None, states, q,
                                 torch.tensor([2], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="B must be"):
        ops_native.selective_scan(x, x, torch.randn(4, 3), torch.randn(5, 2), torch.randn(5, 3),
                                  None, None, None, True, torch.zeros(2, 4, 3), q, slots)


# ---- octavo.ops (the CPU kernels) vs the references -----------------------------------------

def _exact(*tensors):
    return [None if t is None else t.double() for t in tensors]


class Batch:
    """A varlen batch over S state slots: prefill chunks and decode rows, a padding sequence
    (slot -1), sequences with and without an initial state, slots not in order."""

    def __init__(self, lens, num_slots, seed, pad=None, init=None):
        g = torch.Generator().manual_seed(seed)
        self.lens = lens
        self.q = qsl(lens)
        slots = torch.randperm(num_slots, generator=g)[:len(lens)].to(torch.int32)
        if pad is not None:
            slots[pad] = -1
        self.slots = slots
        self.init = (torch.rand(len(lens), generator=g) < 0.5) if init is None else init
        self.g = g

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.g) * scale

    def untouched(self, num_slots):
        used = set(self.slots.tolist())
        return [s for s in range(num_slots) if s not in used]


MIXED_LENS = [1, 37, 1, 2, 0, 5, 1, 13]       # decode rows, prefill chunks, an empty sequence


def _conv_case(b, d, w, dtype, num_slots, strided=False):
    t = sum(b.lens)
    xz = b.randn(t, 2 * d).to(dtype)
    x = xz[:, :d] if strided else xz[:, :d].contiguous()   # a row-strided view, as after in_proj
    weight, bias = b.randn(d, w, scale=0.5), b.randn(d)
    states = b.randn(num_slots, d, w - 1).to(dtype)
    return x, weight, bias, states


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("d,w", [(40, 4), (19, 2), (35, 3), (16, 1)])
def test_causal_conv1d_kernel_matches_reference(dtype, d, w):
    num_slots = 11
    b = Batch(MIXED_LENS, num_slots, seed=d + w, pad=2)
    x, weight, bias, states = _conv_case(b, d, w, dtype, num_slots, strided=d % 2 == 1)
    st_kernel, st_native, st_exact = states.clone(), states.clone(), states.double()
    for act in ("silu", None):
        out = ops.causal_conv1d(x, weight, bias, st_kernel, b.q, b.slots, b.init, act)
        native = ops_native.causal_conv1d(x, weight, bias, st_native, b.q, b.slots, b.init, act)
        exact = ops_native.causal_conv1d(*_exact(x, weight, bias, st_exact), b.q, b.slots, b.init,
                                         act)
        assert_close_to_ref(out, native, exact, what=f"causal_conv1d {act}")
        # the states hold raw inputs: the same values whatever the precision of the arithmetic
        assert torch.equal(st_kernel, st_native)
    assert torch.equal(out[b.q[2]:b.q[3]], torch.zeros_like(out[b.q[2]:b.q[3]]))  # padding row
    keep = b.untouched(num_slots)
    assert torch.equal(st_kernel[keep], states[keep])


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_update_kernel_matches_reference(dtype):
    d, w, num_slots = 37, 4, 9
    b = Batch([1] * 6, num_slots, seed=5, pad=4)
    x, weight, bias, states = _conv_case(b, d, w, dtype, num_slots, strided=True)
    st_kernel, st_native = states.clone(), states.clone()
    out = ops.causal_conv1d_update(x, st_kernel, weight, None, b.slots, "silu")
    native = ops_native.causal_conv1d_update(x, st_native, weight, None, b.slots, "silu")
    exact = ops_native.causal_conv1d_update(*_exact(x, states), weight.double(), None, b.slots,
                                            "silu")
    assert_close_to_ref(out, native, exact, what="causal_conv1d_update")
    assert torch.equal(st_kernel, st_native)
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    keep = b.untouched(num_slots)
    assert torch.equal(st_kernel[keep], states[keep])


def _scan_case(b, d, n, dtype, num_slots, state_dtype=torch.float32, with_z=True):
    t = sum(b.lens)
    proj = b.randn(t, 3 * d).to(dtype)           # u, delta, z as row-strided views of one buffer
    u, delta, z = proj[:, :d], proj[:, d:2 * d] * 0.5, proj[:, 2 * d:]
    bc = b.randn(t, 2 * n + 3).to(dtype)
    B, C = bc[:, 3:3 + n], bc[:, 3 + n:]
    A = -torch.exp(b.randn(d, n, scale=0.5))
    D_skip, delta_bias = b.randn(d), b.randn(d, scale=0.5) - 1.0
    states = b.randn(num_slots, d, n).to(state_dtype)
    return u, delta.to(dtype), A, B, C, D_skip, z if with_z else None, delta_bias, states


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("d,n", [(40, 16), (23, 5), (17, 1)])
def test_selective_scan_kernel_matches_reference(dtype, d, n):
    num_slots = 12
    b = Batch(MIXED_LENS, num_slots, seed=d * n, pad=6)
    u, delta, A, B, C, D_skip, z, delta_bias, states = _scan_case(b, d, n, dtype, num_slots)
    st_kernel, st_native, st_exact = states.clone(), states.clone(), states.double()
    for softplus in (True, False):
        dbias = delta_bias if softplus else delta_bias.abs() + 0.1   # keep dt positive
        args = (A, B, C, D_skip, z, dbias, softplus)
        out = ops.selective_scan(u, delta.abs() if not softplus else delta, *args, st_kernel,
                                 b.q, b.slots, b.init)
        native = ops_native.selective_scan(u, delta.abs() if not softplus else delta, *args,
                                           st_native, b.q, b.slots, b.init)
        exact = ops_native.selective_scan(
            *_exact(u, delta.abs() if not softplus else delta, A, B, C, D_skip, z, dbias),
            softplus, st_exact, b.q, b.slots, b.init)
        assert_close_to_ref(out, native, exact, what=f"selective_scan softplus={softplus}")
        assert_close_to_ref(st_kernel, st_native, st_exact, what="ssm_states")
    pad = slice(int(b.q[6]), int(b.q[7]))
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    keep = b.untouched(num_slots)
    assert torch.equal(st_kernel[keep], states[keep])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_kernel_without_optional_inputs(state_dtype):
    num_slots, d, n = 5, 21, 4
    b = Batch([3, 1, 9], num_slots, seed=7, init=torch.tensor([True, False, True]))
    u, delta, A, B, C, _, _, _, states = _scan_case(b, d, n, torch.bfloat16, num_slots,
                                                    state_dtype=state_dtype)
    st_kernel, st_native = states.clone(), states.clone()
    out = ops.selective_scan(u, delta, A, B, C, None, None, None, True, st_kernel, b.q, b.slots)
    native = ops_native.selective_scan(u, delta, A, B, C, None, None, None, True, st_native, b.q,
                                       b.slots)
    exact = ops_native.selective_scan(*_exact(u, delta, A, B, C), None, None, None, True,
                                      states.double(), b.q, b.slots)
    assert_close_to_ref(out, native, exact, what="selective_scan (no D, z, bias)")
    assert st_kernel.dtype == state_dtype
    torch.testing.assert_close(st_kernel.float(), st_native.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,state_dtype", [(16, torch.float32), (32, torch.bfloat16),
                                           (5, torch.float32)])
def test_selective_state_update_kernel_matches_reference(dtype, n, state_dtype):
    d, num_slots = 37, 10
    b = Batch([1] * 7, num_slots, seed=11, pad=3)
    x, dt, A, B, C, D_skip, z, dt_bias, states = _scan_case(b, d, n, dtype, num_slots,
                                                            state_dtype=state_dtype)
    st_kernel, st_native = states.clone(), states.clone()
    out = ops.selective_state_update(st_kernel, x, dt, A, B, C, D_skip, z, dt_bias, True, b.slots)
    native = ops_native.selective_state_update(st_native, x, dt, A, B, C, D_skip, z, dt_bias,
                                               True, b.slots)
    st_exact = states.double()
    exact = ops_native.selective_state_update(st_exact, *_exact(x, dt, A, B, C, D_skip, z,
                                                                dt_bias), True, b.slots)
    assert_close_to_ref(out, native, exact, what="selective_state_update")
    if state_dtype == torch.float32:
        assert_close_to_ref(st_kernel, st_native, st_exact, what="ssm_states")
    else:   # stored in bf16: at most one rounding apart from the reference's
        torch.testing.assert_close(st_kernel.float(), st_native.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    keep = b.untouched(num_slots)
    assert torch.equal(st_kernel[keep], states[keep])
    # a decode step is the one-token case of the varlen scan (whose kernel sums in another order)
    st_scan = states.clone()
    scan = ops.selective_scan(x, dt, A, B, C, D_skip, z, dt_bias, True, st_scan,
                              qsl([1] * 7), b.slots)
    torch.testing.assert_close(scan, out, **_tol(dtype))
    torch.testing.assert_close(st_scan.float(), st_kernel.float(),
                               **(_tol(state_dtype)))


def _tol(dtype):
    # one rounding of the output apart: decode steps and the varlen scan sum in different orders
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_sequences_carry_state(dtype):
    """A sequence split into chunks (prefill chunks, then decode steps through the update ops)
    gives the same outputs and final states as one unchunked pass: the prefill chunks and the
    conv exactly, the decode steps up to the order of their sums."""
    d, n, w, num_slots = 29, 8, 4, 4
    total = 23
    b = Batch([total], num_slots, seed=13, init=torch.tensor([False]))
    x, weight, bias, cstates = _conv_case(b, d, w, dtype, num_slots)
    u, delta, A, B, C, D_skip, z, delta_bias, sstates = _scan_case(b, d, n, dtype, num_slots)
    cs_full, ss_full = cstates.clone(), sstates.clone()
    conv_full = ops.causal_conv1d(x, weight, bias, cs_full, b.q, b.slots, b.init)
    scan_full = ops.selective_scan(u, delta, A, B, C, D_skip, z, delta_bias, True, ss_full, b.q,
                                   b.slots, b.init)
    cs, ss = cstates.clone(), sstates.clone()
    conv_parts, scan_parts, pos = [], [], 0
    for i, L in enumerate([2, 1, 7, 3, 8]):   # the first chunk is shorter than W-1
        r = slice(pos, pos + L)
        init = torch.tensor([i > 0])
        conv_parts.append(ops.causal_conv1d(x[r], weight, bias, cs, qsl([L]), b.slots, init))
        scan_parts.append(ops.selective_scan(u[r], delta[r], A, B[r], C[r], D_skip, z[r],
                                             delta_bias, True, ss, qsl([L]), b.slots, init))
        pos += L
    assert torch.equal(torch.cat(scan_parts), scan_full[:pos])
    for t in range(pos, total):                # decode steps
        r = slice(t, t + 1)
        conv_parts.append(ops.causal_conv1d_update(x[r], cs, weight, bias, b.slots))
        scan_parts.append(ops.selective_state_update(ss, u[r], delta[r], A, B[r], C[r], D_skip,
                                                     z[r], delta_bias, True, b.slots))
    assert torch.equal(torch.cat(conv_parts), conv_full) and torch.equal(cs, cs_full)
    torch.testing.assert_close(torch.cat(scan_parts), scan_full, **_tol(dtype))
    torch.testing.assert_close(ss, ss_full, atol=1e-5, rtol=1e-5)


def test_kernel_argument_errors():
    x = torch.randn(5, 4)
    states = torch.zeros(2, 4, 3)
    q, slots = qsl([5]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc"):
        ops.causal_conv1d(x, torch.randn(4, 4), None, states, qsl([2, 2]),
                          torch.tensor([0, 1], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="state_indices"):
        ops.selective_state_update(torch.zeros(2, 4, 3), x, x, torch.randn(4, 3),
                                   torch.randn(5, 3), torch.randn(5, 3), None, None, None, True,
                                   torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="A must be"):
        ops.selective_scan(x, x, torch.randn(3, 3), torch.randn(5, 3), torch.randn(5, 3),
                           None, None, None, True, torch.zeros(2, 4, 3), q, slots)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_opcheck(dtype):
    b = Batch([3, 1, 4], 5, seed=17, pad=1)
    x, weight, bias, cstates = _conv_case(b, 12, 4, dtype, 5)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.octavo.causal_conv1d.default,
                          (out, x, weight, bias, cstates, b.q, b.slots, b.init, True))
    torch.library.opcheck(torch.ops.octavo.causal_conv1d_update.default,
                          (out[:3], x[:3], cstates, weight, None, b.slots, False))
    u, delta, A, B, C, D_skip, z, delta_bias, sstates = _scan_case(b, 12, 4, dtype, 5)
    out = torch.empty_like(u)
    torch.library.opcheck(torch.ops.octavo.selective_scan.default,
                          (out, u, delta, A, B, C, D_skip, z, delta_bias, True, sstates, b.q,
                           b.slots, b.init))
    torch.library.opcheck(torch.ops.octavo.selective_state_update.default,
                          (out[:3], sstates, u[:3], delta[:3], A, B[:3], C[:3], D_skip, z[:3],
                           delta_bias, True, b.slots))


VARIANT_SCRIPT = r"""
import torch
import test_mamba_ops as t
for dtype in (torch.float32, torch.bfloat16):
    t.test_causal_conv1d_kernel_matches_reference(dtype, 35, 3)
    t.test_selective_scan_kernel_matches_reference(dtype, 23, 5)
    t.test_selective_state_update_kernel_matches_reference(dtype, 16, torch.float32)
    t.test_selective_state_update_kernel_matches_reference(dtype, 32, torch.bfloat16)
    t.test_chunked_sequences_carry_state(dtype)
print("ok")
"""


@pytest.mark.parametrize("cap", ["default", "avx2"])
def test_mamba_kernel_variants(cap):
    """The kernels built for the lower CPU capabilities (ATEN_CPU_CAPABILITY) agree too."""
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], cwd=os.path.dirname(__file__),
                         env=dict(os.environ, ATEN_CPU_CAPABILITY=cap), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---- the CUDA kernels on a GPU (the same kernels run under the emulator in tests/simt) ------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_cuda_kernels_match_reference(dtype):
    num_slots = 12
    b = Batch(MIXED_LENS, num_slots, seed=3, pad=6)
    q, slots, init = _cuda(b.q, b.slots, b.init)
    x, weight, bias, cstates = _cuda(*_conv_case(b, 70, 4, dtype, num_slots, strided=True))
    cs_kernel, cs_native = cstates.clone(), cstates.clone()
    out = ops.causal_conv1d(x, weight, bias, cs_kernel, q, slots, init)
    native = ops_native.causal_conv1d(x, weight, bias, cs_native, q, slots, init)
    exact = ops_native.causal_conv1d(*_exact(x, weight, bias, cstates), q, slots, init)
    assert_close_to_ref(out, native, exact, what="cuda causal_conv1d")
    assert torch.equal(cs_kernel, cs_native)
    u, delta, A, B, C, D_skip, z, dbias, states = _cuda(*_scan_case(b, 70, 16, dtype, num_slots))
    st_kernel, st_native = states.clone(), states.clone()
    out = ops.selective_scan(u, delta, A, B, C, D_skip, z, dbias, True, st_kernel, q, slots, init)
    native = ops_native.selective_scan(u, delta, A, B, C, D_skip, z, dbias, True, st_native, q,
                                       slots, init)
    st_exact = states.double()
    exact = ops_native.selective_scan(*_exact(u, delta, A, B, C, D_skip, z, dbias), True,
                                      st_exact, q, slots, init)
    assert_close_to_ref(out, native, exact, what="cuda selective_scan")
    assert_close_to_ref(st_kernel, st_native, st_exact, what="cuda ssm_states")


@needs_cuda
def test_cuda_decode_ops_replay_from_a_graph():
    """The decode ops captured once in a CUDA graph, replayed on new inputs in the static
    buffers (a padding row with slot -1 included), equal eager reference steps."""
    d, n, w, num_slots, batch = 96, 16, 4, 8, 5
    b = Batch([1] * batch, num_slots, seed=21, pad=4)
    slots = b.slots.cuda()
    weight, bias = _cuda(b.randn(d, w), b.randn(d))
    A, D_skip, dbias = _cuda(-torch.exp(b.randn(d, n, scale=0.5)), b.randn(d), b.randn(d))
    cs, ss = _cuda(b.randn(num_slots, d, w - 1).bfloat16(), b.randn(num_slots, d, n))
    cs_ref, ss_ref = cs.clone(), ss.clone()
    xs = torch.zeros(batch, d, dtype=torch.bfloat16, device="cuda")
    dts, zs = torch.zeros_like(xs), torch.zeros_like(xs)
    Bs = torch.zeros(batch, n, dtype=torch.bfloat16, device="cuda")
    Cs = torch.zeros_like(Bs)

    def step():
        h = ops.causal_conv1d_update(xs, cs, weight, bias, slots)
        return ops.selective_state_update(ss, h, dts, A, Bs, Cs, D_skip, zs, dbias, True, slots)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):   # warm up outside the graph, then undo its state updates
        step()
    torch.cuda.current_stream().wait_stream(s)
    cs.copy_(cs_ref)
    ss.copy_(ss_ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    for i in range(3):
        for buf in (xs, dts, zs, Bs, Cs):
            buf.copy_(torch.randn(buf.shape, generator=b.g).to(buf.dtype))
        graph.replay()
        h = ops_native.causal_conv1d_update(xs, cs_ref, weight, bias, slots)
        y = ops_native.selective_state_update(ss_ref, h, dts, A, Bs, Cs, D_skip, zs, dbias, True,
                                              slots)
        torch.testing.assert_close(y_static, y, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(cs, cs_ref, atol=0, rtol=0)
        torch.testing.assert_close(ss, ss_ref, atol=1e-3, rtol=1e-3)
