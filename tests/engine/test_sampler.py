"""The batched sampler against references written here with plain loops over the vocabulary."""
import math

import pytest
import torch

from octavo import sampler as S
from octavo.sampler import Sampler, SamplingState, compute_prompt_logprobs
from octavo.sampling_params import SamplingParams

V = 40
EOS = 2


def state(prompt=(5, 6, 7), output=(), seed=None, bad_words=None, **kw):
    params = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingState(params, list(prompt), list(output), gen, bad_words)


def reference_process(logits, st, eos_ids=(EOS,)):
    """Allowed ids, logit bias, bad words, min_tokens, penalties; one token at a time."""
    p, out = st.params, list(st.output_token_ids)
    x = [float(v) for v in logits]
    if p.allowed_token_ids:
        x = [v if t in p.allowed_token_ids else -math.inf for t, v in enumerate(x)]
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for word in st.bad_words_token_ids or []:
        if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]):
            x[word[-1]] = -math.inf
    if len(out) < p.min_tokens:
        for t in list(eos_ids) + p.stop_token_ids:
            x[t] = -math.inf
    seen = set(st.prompt_token_ids) | set(out)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * out.count(t)
        x[t] -= p.presence_penalty * (t in out)
    return torch.tensor(x)


def reference_support(logits, p):
    """Tokens that may be sampled after temperature, min_p, top_k, top_p (vLLM's rules)."""
    x = [float(v) / p.temperature for v in logits]
    probs = [math.exp(v - max(x)) for v in x]
    total = sum(probs)
    probs = [q / total for q in probs]
    keep = [q >= p.min_p * max(probs) for q in probs]
    order = sorted(range(len(x)), key=lambda t: -x[t])
    if p.top_k > 0:
        kth = x[order[p.top_k - 1]]
        keep = [k and x[t] >= kth for t, k in enumerate(keep)]
    kept = [t for t in order if keep[t]]
    mass = sum(probs[t] for t in kept)
    above, support = 0.0, []
    for t in kept:
        if support and above >= p.top_p * mass - 1e-9:
            break
        support.append(t)
        above += probs[t]
    return {t: probs[t] / sum(probs[u] for u in support) for t in support}


def test_all_greedy_fast_path_is_argmax():
    logits = torch.randn(6, V)
    out = Sampler(EOS)(logits, [state(temperature=0.0) for _ in range(6)])
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_penalties_bias_allowed_bad_words_min_tokens_match_reference():
    torch.manual_seed(0)
    rows = [
        state(prompt=[1, 3, 3, 9], output=[3, 4, 4, 4, 10], repetition_penalty=1.7),
        state(prompt=[], output=[7, 7, 8], frequency_penalty=0.9, presence_penalty=-0.6),
        state(prompt=[11], output=[12, 12], repetition_penalty=0.5, frequency_penalty=-1.5,
              presence_penalty=2.0, logit_bias={0: 3.5, 12: -1.0}),
        state(allowed_token_ids=[1, 2, 5, 30], logit_bias={5: 1.0, 6: 50.0}),
        state(output=[20, 21], bad_words=[[13], [21, 22], [20, 23], [19, 21, 24], [20, 21, 25]]),
        state(output=[1, 2], min_tokens=3, stop_token_ids=[4, 17]),
        state(output=[1, 2, 3], min_tokens=3, stop_token_ids=[4, 17]),   # min_tokens reached
        state(),
    ]
    logits = torch.randn(len(rows), V) * 3
    processed = S.apply_penalties(S.apply_logits_processors(logits.clone(), rows, [EOS]), rows)
    for i, st in enumerate(rows):
        torch.testing.assert_close(processed[i], reference_process(logits[i], st))
    # row 4: 13, 22, 25 banned; 23 not (prefix 20 is not last); 24 not (19 not generated)
    assert torch.isinf(processed[4, [13, 22, 25]]).all() and not torch.isinf(processed[4, [23, 24]]).any()
    assert torch.isinf(processed[5, [EOS, 4, 17]]).all() and not torch.isinf(processed[6]).any()
    greedy_rows = [SamplingState(SamplingParams(**{**_kw(st.params), "temperature": 0.0}),
                                 st.prompt_token_ids, st.output_token_ids, None,
                                 st.bad_words_token_ids) for st in rows]
    out = Sampler(EOS)(logits, greedy_rows)
    assert out.sampled_token_ids == [int(reference_process(logits[i], st).argmax())
                                     for i, st in enumerate(rows)]


def test_greedy_with_only_bans_skips_to_argmax_unless_it_is_banned():
    """Greedy rows under min_tokens / bad words: the raw argmax when it is allowed, the best
    allowed token when the raw argmax is banned; the caller's logits are never modified."""
    logits = torch.randn(4, V)
    logits[0, EOS] = 50.0      # banned under min_tokens: the runner-up must win
    logits[1, 17] = 50.0       # a stop token, banned under min_tokens
    logits[2, 22] = 50.0       # the last token of a bad word whose prefix [21] was generated
    logits[3, 9] = 50.0        # allowed: min_tokens bans only EOS and stop tokens
    rows = [state(output=[1], min_tokens=5, temperature=0.0),
            state(output=[1], min_tokens=5, stop_token_ids=[17], temperature=0.0),
            state(output=[21], bad_words=[[21, 22]], temperature=0.0),
            state(output=[1], min_tokens=5, temperature=0.0)]
    before = logits.clone()
    toks = Sampler(EOS)(logits, rows).sampled_token_ids
    assert toks == [int(reference_process(logits[i], st).argmax()) for i, st in enumerate(rows)]
    assert toks[0] != EOS and toks[1] != 17 and toks[2] != 22 and toks[3] == 9
    torch.testing.assert_close(logits, before, rtol=0, atol=0)
    # nothing banned is on top: the same tokens as plain argmax
    calm = torch.randn(4, V)
    calm[:, [EOS, 17, 22]] = -5.0
    assert Sampler(EOS)(calm, rows).sampled_token_ids == calm.argmax(-1).tolist()


def _kw(p):
    return dict(repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty, logit_bias=p.logit_bias,
                allowed_token_ids=p.allowed_token_ids, min_tokens=p.min_tokens,
                stop_token_ids=p.stop_token_ids)


def test_allowed_token_ids_restrict_random_sampling():
    rows = [state(allowed_token_ids=[3, 9, 27], temperature=1.5) for _ in range(300)]
    toks = Sampler(EOS)(torch.randn(300, V), rows).sampled_token_ids
    assert set(toks) <= {3, 9, 27} and len(set(toks)) == 3


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(16, V)
    rows = [state(temperature=1.3, top_k=1, seed=i) for i in range(16)]
    assert Sampler(EOS)(logits, rows).sampled_token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(2)
    logits = torch.randn(8, V)
    rows = [state(temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(8)]
    toks = Sampler(EOS)(logits, rows).sampled_token_ids
    assert [toks[i] for i in range(1, 8, 2)] == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.2, min_p=0.15),
    dict(temperature=0.9, top_k=8, top_p=0.7),
    dict(temperature=1.0, top_k=6, top_p=0.8, min_p=0.1),
])
def test_truncation_support_and_frequencies(kw):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(V, generator=gen) * 1.5
    num = 4000
    rows = [state(**kw) for _ in range(num)]
    torch.manual_seed(3)
    toks = Sampler(EOS)(base.expand(num, V).contiguous(), rows).sampled_token_ids
    expected = reference_support(base, rows[0].params)
    counts = torch.bincount(torch.tensor(toks), minlength=V).double() / num
    assert set(toks) <= set(expected)
    for t, prob in expected.items():
        # 5 standard deviations of a binomial frequency
        assert abs(counts[t].item() - prob) <= 5 * math.sqrt(prob * (1 - prob) / num) + 1e-3


def test_seeded_request_is_reproducible_alone_and_in_any_batch():
    torch.manual_seed(4)
    steps = [torch.randn(5, V) for _ in range(6)]
    kw = dict(temperature=0.9, top_p=0.9, top_k=20)

    def run(rows, target):
        """Decode len(steps) tokens; the target row always sees logits row 3."""
        tokens = []
        for logits in steps:
            batch_logits = logits[3:4] if len(rows) == 1 else logits
            out = Sampler(EOS)(batch_logits, rows)
            tokens.append(out.sampled_token_ids[target])
            for st, t in zip(rows, out.sampled_token_ids):
                st.output_token_ids.append(t)
        return tokens

    alone = run([state(seed=42, **kw)], 0)
    assert run([state(seed=42, **kw)], 0) == alone
    in_batch = run([state(**kw), state(seed=7, **kw), state(temperature=0.0),
                    state(seed=42, **kw), state(min_p=0.1)], 3)
    assert in_batch == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    a = [Sampler()(logits, [state(seed=s)]).sampled_token_ids[0] for s in range(8)]
    assert len(set(a)) > 1


def test_logprobs_and_ranks_from_raw_logits():
    torch.manual_seed(5)
    logits = torch.randn(4, V) * 2
    rows = [state(temperature=0.0, logprobs=3, repetition_penalty=2.0, output=[1, 2, 3]),
            state(temperature=1.0, logprobs=0, seed=1),
            state(temperature=0.8, logprobs=5, seed=2, logit_bias={7: -100.0}),
            state(temperature=1.0)]
    out = Sampler(EOS)(logits, rows)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, st in enumerate(rows):
        k = st.params.logprobs
        if k is None:
            assert out.logprobs[i] is None
            continue
        lp = out.logprobs[i]
        tok = out.sampled_token_ids[i]
        order = sorted(range(V), key=lambda t: -ref[i, t].item())
        expected_ids = {tok} | set(order[:k])
        assert set(lp) == expected_ids
        for t, entry in lp.items():
            assert entry.logprob == pytest.approx(ref[i, t].item(), abs=1e-5)
            assert entry.rank == order.index(t) + 1
            assert entry.decoded_token is None


def test_compute_prompt_logprobs():
    torch.manual_seed(6)
    logits = torch.randn(5, V)
    targets = [3, 1, 4, 1, 5]
    res = compute_prompt_logprobs(logits, targets, 2)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, t in enumerate(targets):
        order = sorted(range(V), key=lambda u: -ref[i, u].item())
        assert set(res[i]) == {t} | set(order[:2])
        assert res[i][t].logprob == pytest.approx(ref[i, t].item(), abs=1e-5)
        assert res[i][t].rank == order.index(t) + 1


def test_windowed_top_k_top_p_equals_full_sort():
    torch.manual_seed(7)
    for _ in range(15):
        n, v = 6, 2048
        logits = torch.randn(n, v) * torch.rand(n, 1) * 8
        k = torch.randint(1, 200, (n,))
        k[torch.rand(n) < 0.5] = v
        p = torch.rand(n) * 0.9 + 0.05
        p[torch.rand(n) < 0.2] = 1.0
        for top_k, top_p in [(k, p), (None, p), (k, None)]:
            fast = S.apply_top_k_top_p(logits, top_k, top_p)
            full = S._top_k_top_p_sorted(logits, top_k, top_p)
            assert torch.equal(torch.isinf(fast), torch.isinf(full))


def test_logits_are_not_modified():
    logits = torch.randn(3, V)
    copy = logits.clone()
    Sampler(EOS)(logits, [state(repetition_penalty=1.5, output=[1]), state(min_tokens=2),
                          state(temperature=0.5, top_p=0.5, logit_bias={1: 5.0})])
    assert torch.equal(logits, copy)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.randn(2, V), [state()])
