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
