"""The batched sampler: one call per engine step turns logits [N, V] into N next tokens.

Order (as vLLM V1): logprobs from the raw logits; allowed_token_ids, logit_bias, bad_words,
min_tokens; repetition / frequency / presence penalties; greedy argmax; temperature, min_p,
top_k, top_p; random sampling by inverse CDF (one uniform draw per row), with a
per-request torch.Generator for seeded requests (so a seeded request samples the same tokens
alone or in any batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from octavo import ops
from octavo.outputs import Logprob
from octavo.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What the sampler needs to know about one request (one row of the logits).

    generator: a torch.Generator on the logits' device seeded with params.seed (the engine keeps
    one per seeded request for its whole life); None draws from torch's default generator.
    bad_words_token_ids: params.bad_words_token_ids(tokenizer), computed once per request.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    bad_words_token_ids: list[list[int]] | None = None


@dataclass
class SamplerOutput:
    """sampled_token_ids[i] is row i's token. logprobs[i] is None unless params.logprobs was set;
    then it maps token id -> Logprob for the top-`logprobs` tokens (ranks 1..k) plus the sampled
    token (rank = 1-based rank by raw logprob). decoded_token is left None (see detokenizer)."""

    sampled_token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)


@dataclass
class SamplingMetadata:
    """Per-batch tensors [N] built once per step from the SamplingStates."""

    temperature: torch.Tensor        # float32, 1.0 for greedy rows
    top_p: torch.Tensor | None       # float32, None when no row uses top-p
    top_k: torch.Tensor | None       # int64 (V when disabled), None when no row uses top-k
    min_p: torch.Tensor | None       # float32, None when no row uses min-p
    greedy: torch.Tensor             # bool
    all_greedy: bool
    all_random: bool
    needs_processing: bool           # any logit processor or penalty is active
    max_num_logprobs: int | None

    @classmethod
    def build(cls, batch: Sequence[SamplingState], vocab_size: int,
              device: torch.device) -> "SamplingMetadata":
        params = [s.params for s in batch]
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_top_k = any(0 < p.top_k < vocab_size for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        nums = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            if use_top_p else None,
            top_k=torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size
                                for p in params], dtype=torch.int64, device=device)
            if use_top_k else None,
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            if use_min_p else None,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            needs_processing=any(_needs_processing(s) for s in batch),
            max_num_logprobs=max(nums) if nums else None,
        )


def _rewrites_logits(s: SamplingState) -> bool:
    """Whether processing changes this row's logits other than by banning tokens."""
    p = s.params
    return bool(p.allowed_token_ids or p.logit_bias or p.repetition_penalty != 1.0
                or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)


def _needs_processing(s: SamplingState) -> bool:
    return bool(_rewrites_logits(s) or s.bad_words_token_ids
                or len(s.output_token_ids) < s.params.min_tokens)


class Sampler:
    """Sampler(eos_token_ids): the EOS ids are banned (with stop_token_ids) under min_tokens."""

    def __init__(self, eos_token_ids: Iterable[int] | int | None = ()):
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, batch: Sequence[SamplingState]) -> SamplerOutput:
        return self.forward(logits, batch)

    def forward(self, logits: torch.Tensor, batch: Sequence[SamplingState]) -> SamplerOutput:
        """logits: [N, V] (float32 preferred; not modified). batch: N SamplingStates."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"logits must be [N, V] with N={len(batch)} rows, "
                             f"got {tuple(logits.shape)}.")
        logits = logits.float()
        meta = SamplingMetadata.build(batch, logits.shape[1], logits.device)
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if meta.max_num_logprobs is not None else None)

        sampled = None
        if meta.needs_processing and meta.all_greedy and not any(map(_rewrites_logits, batch)):
            # greedy rows whose processing only bans tokens (min_tokens, bad words): the argmax
            # stands unless it is banned, so the [N, V] copy is made only when one is
            top = ops.argmax_rows(logits)
            if not _hits_ban(top.tolist(), batch, self.eos_token_ids):
                sampled = top
        if sampled is None:
            if meta.needs_processing:
                logits = apply_logits_processors(logits.clone(), batch, self.eos_token_ids)
                logits = apply_penalties(logits, batch)
            if meta.all_greedy:
                sampled = ops.argmax_rows(logits)
            else:
                sampled = sample_random(logits, batch, meta)
                if not meta.all_random:
                    sampled = torch.where(meta.greedy, ops.argmax_rows(logits), sampled)

        logprobs: list[dict[int, Logprob] | None] = [None] * len(batch)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled,
                                       [s.params.logprobs for s in batch])
        return SamplerOutput(sampled_token_ids=sampled.tolist(), logprobs=logprobs)


def _hits_ban(tokens: Sequence[int], batch: Sequence[SamplingState],
              eos_token_ids: Sequence[int]) -> bool:
    return any(tok in _bad_word_bans(s) or tok in _min_tokens_bans(s, eos_token_ids)
               for tok, s in zip(tokens, batch))


def apply_logits_processors(logits: torch.Tensor, batch: Sequence[SamplingState],
                            eos_token_ids: Sequence[int]) -> torch.Tensor:
    """In place on logits [N, V]: allowed_token_ids, logit_bias, bad_words, min_tokens."""
    num_rows, vocab_size = logits.shape
    allowed_rows = [i for i, s in enumerate(batch) if s.params.allowed_token_ids]
    if allowed_rows:
        keep = torch.zeros(len(allowed_rows), vocab_size, dtype=torch.bool, device=logits.device)
        for j, i in enumerate(allowed_rows):
            keep[j, batch[i].params.allowed_token_ids] = True
        rows = torch.tensor(allowed_rows, device=logits.device)
        logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))

    bias_rows, bias_cols, bias_vals = [], [], []
    ban_rows, ban_cols = [], []
    for i, s in enumerate(batch):
        p = s.params
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_cols += list(p.logit_bias.keys())
            bias_vals += list(p.logit_bias.values())
        for cols in (_bad_word_bans(s), _min_tokens_bans(s, eos_token_ids)):
            ban_rows += [i] * len(cols)
            ban_cols += cols
    if bias_rows:
        logits.index_put_((_long(bias_rows, logits), _long(bias_cols, logits)),
                          torch.tensor(bias_vals, dtype=logits.dtype, device=logits.device),
                          accumulate=True)
    if ban_rows:
        logits[_long(ban_rows, logits), _long(ban_cols, logits)] = float("-inf")
    return logits


def _long(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)


def _bad_word_bans(s: SamplingState) -> list[int]:
    """Last token of each bad word whose preceding tokens are the last generated ones."""
    bans = []
    out = s.output_token_ids
    for word in s.bad_words_token_ids or ():
        prefix_len = len(word) - 1
        if prefix_len > len(out):
            continue
        if prefix_len == 0 or list(out[len(out) - prefix_len:]) == list(word[:-1]):
            bans.append(word[-1])
    return bans


def _min_tokens_bans(s: SamplingState, eos_token_ids: Sequence[int]) -> list[int]:
    if len(s.output_token_ids) >= s.params.min_tokens:
        return []
    return list(dict.fromkeys([*eos_token_ids, *s.params.stop_token_ids]))


def apply_penalties(logits: torch.Tensor, batch: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition (prompt + output tokens), frequency and presence (output tokens) penalties.

    Works on the token positions only, O(N * seq_len), not O(N * V): token lists are padded
    with V into [N, L] index tensors over a copy of the logits with one extra column (V) that
    absorbs the padding. Gather-then-scatter is idempotent for repeated tokens.
    """
    rep = [s.params.repetition_penalty for s in batch]
    freq = [s.params.frequency_penalty for s in batch]
    pres = [s.params.presence_penalty for s in batch]
    use_rep = any(r != 1.0 for r in rep)
    if not use_rep and not any(freq) and not any(pres):
        return logits
    num_rows, vocab_size = logits.shape
    ext = torch.cat([logits, logits.new_zeros(num_rows, 1)], dim=1)        # [N, V + 1]
    if use_rep:
        seen = _pad_tokens([[*s.prompt_token_ids, *s.output_token_ids] for s in batch],
                           vocab_size, logits.device)
        penalty = torch.tensor(rep, dtype=logits.dtype, device=logits.device).unsqueeze(1)
        vals = ext.gather(1, seen)
        ext.scatter_(1, seen, torch.where(vals > 0, vals / penalty, vals * penalty))
    out = _pad_tokens([s.output_token_ids for s in batch], vocab_size, logits.device)
    if any(freq):
        f = torch.tensor(freq, dtype=logits.dtype, device=logits.device).unsqueeze(1)
        ext.scatter_add_(1, out, (-f).expand(out.shape).contiguous())
    if any(pres):
        pr = torch.tensor(pres, dtype=logits.dtype, device=logits.device).unsqueeze(1)
        ext.scatter_(1, out, ext.gather(1, out) - pr)
    return ext[:, :vocab_size]


def _pad_tokens(token_lists: Sequence[Sequence[int]], pad: int,
                device: torch.device) -> torch.Tensor:
    """[N, max(1, L)] int64, each row's tokens followed by `pad`."""
    width = max(1, max((len(t) for t in token_lists), default=0))
    rows = [[*t, *([pad] * (width - len(t)))] for t in token_lists]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def truncated_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p, softmax: the distribution a row samples from."""
    logits = logits / meta.temperature.unsqueeze(1)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return torch.softmax(logits, dim=-1)


def sampling_probs(logits: torch.Tensor, batch: Sequence[SamplingState],
                   eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution each row of logits [N, V] is sampled from, after every processor and
    penalty ([N, V] float32; a greedy row's argmax is its token), and the greedy mask [N].
    Speculative decoding verifies drafts against it."""
    logits = logits.float()
    meta = SamplingMetadata.build(batch, logits.shape[1], logits.device)
    if meta.needs_processing:
        logits = apply_penalties(apply_logits_processors(logits.clone(), batch, eos_token_ids),
                                 batch)
    return truncated_probs(logits, meta), meta.greedy


def sample_random(logits: torch.Tensor, batch: Sequence[SamplingState],
                  meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p, then inverse-CDF sampling. Returns [N] int64."""
    probs = truncated_probs(logits, meta)
    # Inverse-CDF sampling: one uniform draw per row (not one per vocabulary entry), u in (0, 1]
    # so that a zero-probability head can never be picked. Greedy rows leave their generator
    # untouched: only sampling advances a seeded stream.
    u = torch.empty(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    seeded = [i for i, s in enumerate(batch)
              if s.generator is not None and not s.params.is_greedy]
    if len(seeded) < len(batch):
        u.uniform_()
    for i in seeded:
        u[i].uniform_(generator=batch[i].generator)
    cdf = probs.cumsum_(dim=-1)
    target = (1.0 - u) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_(max=probs.shape[1] - 1).squeeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * (the row's top probability).

    p_v < min_p * p_max  <=>  logit_v < logit_max + log(min_p): no softmax needed."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


# Top-p without top-k first tries the largest _TOP_P_WINDOW logits: when they already hold
# probability >= p the answer is exact without sorting the whole vocabulary.
_TOP_P_WINDOW = 1024


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """top_k [N] int64 (V = off) keeps the k largest logits (and ties with the k-th);
    top_p [N] keeps the smallest set of top tokens whose probability (after top-k) reaches p.

    Only a window of the largest logits is ever kept when every row has a top-k, or has a
    top-p that the window's probability mass covers; one topk then replaces a full sort."""
    num_rows, vocab_size = logits.shape
    k = top_k if top_k is not None else torch.full((num_rows,), vocab_size,
                                                    dtype=torch.int64, device=logits.device)
    limited = k < vocab_size
    max_finite_k = int(k[limited].max()) if bool(limited.any()) else 0
    window = max_finite_k if bool(limited.all()) else max(max_finite_k, _TOP_P_WINDOW)
    if window >= vocab_size:
        return _top_k_top_p_sorted(logits, top_k, top_p)
    vals, idx = logits.topk(window, dim=-1)                                # descending
    lse_full = None
    if not bool(limited.all()):
        if top_p is None:
            return _top_k_top_p_sorted(logits, top_k, top_p)
        lse_full = torch.logsumexp(logits, dim=-1)
        mass = torch.exp(torch.logsumexp(vals, dim=-1) - lse_full)
        if not bool((limited | ((top_p < 1.0) & (mass >= top_p))).all()):
            return _top_k_top_p_sorted(logits, top_k, top_p)
    kth = vals.gather(1, (k.clamp(max=window) - 1).unsqueeze(1))
    vals = vals.masked_fill(vals < kth, float("-inf"))
    if top_p is not None:
        # Probabilities over the top-k set: the window for limited rows, else the vocabulary.
        lse = torch.logsumexp(vals, dim=-1)
        if lse_full is not None:
            lse = torch.where(limited, lse, lse_full)
        probs = torch.exp(vals - lse.unsqueeze(1))
        # Drop a token once the tokens above it already reach p (keeps at least the top one).
        mass_above = probs.cumsum(dim=-1) - probs
        drop = (mass_above >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, idx, vals)


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor | None,
                        top_p: torch.Tensor | None) -> torch.Tensor:
    """The general case (some row has no top-k): one ascending sort of each row."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: Sequence[int | None]) -> list[dict[int, Logprob] | None]:
    """For row i with num_logprobs[i] = k (None = skip): the top-k tokens with ranks 1..k plus
    token_ids[i] with its rank, counted as vLLM does: #{v : logprob[v] >= logprob[token]}."""
    max_k = max((k for k in num_logprobs if k is not None), default=0)
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1))                  # [N, 1]
    ranks = (logprobs >= token_lp).sum(dim=-1).tolist()
    token_lp = token_lp.squeeze(1).tolist()
    token_ids = token_ids.tolist()
    if max_k > 0:
        top_vals, top_ids = logprobs.topk(max_k, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    result: list[dict[int, Logprob] | None] = []
    for i, k in enumerate(num_logprobs):
        if k is None:
            result.append(None)
            continue
        row = {token_ids[i]: Logprob(token_lp[i], ranks[i])}
        for r in range(k):
            row.setdefault(top_ids[i][r], Logprob(top_vals[i][r], r + 1))
        result.append(row)
    return result


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor | Sequence[int],
                            num_logprobs: int) -> list[dict[int, Logprob]]:
    """logits [P, V] predicting target_token_ids [P]: per position, the target token's logprob
    and rank plus the top-num_logprobs tokens (the engine prepends None for the first prompt
    token, which has no logprob)."""
    target = torch.as_tensor(target_token_ids, dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return gather_logprobs(logprobs, target, [num_logprobs] * logits.shape[0])
