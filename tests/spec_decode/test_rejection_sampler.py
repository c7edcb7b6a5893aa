"""The rejection sampler emits tokens with the target's distribution, whatever the draft
(chi-square tests on a tiny vocabulary, significance 0.001 each), and the target's argmax
for greedy requests; the distribution tests run through the reference and the kernel
(octavo.ops.rejection_sample: the CPU kernel here)."""
import pytest
import torch

from octavo import ops
from octavo.spec_decode.rejection import PAD, rejection_sample

ALPHA = 1e-3


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for X ~ chi-square with (categories - 1) degrees of freedom."""
    n = counts.sum()
    expected = probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    stat = ((counts[keep].double() - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _random_dists(g, *shape):
    return torch.softmax(torch.randn(*shape, generator=g) * 1.5, dim=-1)


SAMPLERS = pytest.mark.parametrize("sample", [rejection_sample, ops.rejection_sample],
                                   ids=["reference", "kernel"])


@SAMPLERS
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_emitted_tokens_follow_the_target(with_draft_probs, sample):
    g = torch.Generator().manual_seed(0)
    B, K, V = 20000, 3, 5
    p = _random_dists(g, K + 1, V)                         # the same target for every row
    q = _random_dists(g, K, V)
    if with_draft_probs:
        drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g)
                              for i in range(K)], dim=1)
        draft_probs = q.expand(B, K, V)
    else:                                  # n-gram: one fixed guess per position, a likely one
        drafts = p[:K].argmax(dim=-1).expand(B, K)
        draft_probs = None
    out = sample(drafts, torch.full((B,), K), draft_probs, p.expand(B, K + 1, V),
                 torch.rand(B, K, generator=g),
                 torch.empty(B, K + 1, V).exponential_(generator=g),
                 torch.zeros(B, dtype=torch.bool))
    lengths = (out != PAD).sum(dim=1)
    assert lengths.min() >= 1
    for i in range(K + 1):
        reached = out[lengths > i, i]
        assert reached.numel() > 500, i
        counts = torch.bincount(reached, minlength=V)
        assert chi_square_p_value(counts, p[i]) > ALPHA, (i, counts, p[i])
    # first position: accepted with probability sum_x min(p(x), q(x)) (hand formula)
    q1 = q[0] if with_draft_probs else torch.nn.functional.one_hot(drafts[0, 0], V).float()
    accept = torch.minimum(p[0], q1).sum()
    rate = (lengths > 1).double().mean()
    assert abs(rate - accept) < 4 * (accept * (1 - accept) / B) ** 0.5 + 1e-9


def test_chi_square_check_can_fail():
    """The test above would notice a sampler that emits the draft's distribution."""
    g = torch.Generator().manual_seed(1)
    p, q = _random_dists(g, 5), _random_dists(g, 5)
    counts = torch.bincount(torch.multinomial(q, 20000, replacement=True, generator=g), minlength=5)
    assert chi_square_p_value(counts, p) < ALPHA


@SAMPLERS
def test_greedy_rows_emit_the_target_argmax(sample):
    V = 6
    target = torch.zeros(3, 4, V)
    argmax = torch.tensor([[1, 2, 3, 4], [1, 5, 0, 0], [2, 2, 2, 2]])
    target.scatter_(2, argmax.unsqueeze(-1), 1.0)
    target = torch.softmax(target * 3, dim=-1)
    drafts = torch.tensor([[1, 2, 3], [1, 4, 0], [0, 0, 0]])
    out = sample(drafts, torch.tensor([3, 3, 2]), None, target, torch.rand(3, 3),
                 torch.empty(3, 4, V).exponential_(), torch.ones(3, dtype=torch.bool))
    assert out.tolist() == [[1, 2, 3, 4],          # all accepted, bonus = argmax at position 3
                            [1, 5, PAD, PAD],      # 4 rejected: the target's 5 instead
                            [2, PAD, PAD, PAD]]    # first rejected


def test_rows_with_fewer_drafts_and_shape_errors():
    V = 4
    target = torch.softmax(torch.randn(2, 3, V), dim=-1)
    out = rejection_sample(torch.tensor([[0, 0], [1, 1]]), torch.tensor([0, 1]), None, target,
                           torch.rand(2, 2), torch.empty(2, 3, V).exponential_(),
                           torch.zeros(2, dtype=torch.bool))
    assert (out[0, 1:] == PAD).all() and out[0, 0] != PAD      # no drafts: one token
    assert (out[1, 2:] == PAD).all()
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 2]), None,
                         target[:, :2], torch.rand(2, 2), torch.ones(2, 2, V),
                         torch.zeros(2, dtype=torch.bool))
