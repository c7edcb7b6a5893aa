"""The engine's side of speculative decoding: ask the proposer for drafts after each step, and
turn the verification step's logits (one row for a request's last token and one per draft) into
the tokens it emits with the rejection sampler.

The target's distribution at row j of a request is the sampler's own (every logits processor,
penalty, temperature and top-k/top-p applied, with the drafts before row j counted as output
tokens), so accepting drafts changes how fast tokens come, never which tokens can come.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from octavo import ops
from octavo.request import Request
from octavo.sampler import SamplingState, gather_logprobs, sampling_probs

from .config import SpeculativeConfig
from .ngram import NgramProposer
from .rejection import PAD


@dataclass
class SpecDecodeStats:
    """Counts since the engine started. A draft is one request's proposal verified in a step."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification step emits per request on average (accepted drafts + 1)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class _NgramDrafts:
    def __init__(self, spec: SpeculativeConfig) -> None:
        self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_max,
                                      spec.prompt_lookup_min)

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]):
        return [(self.proposer.propose(r.all_token_ids)[:k], None) for r, k in zip(reqs, ks)]

    def forget(self, req: Request) -> None:
        pass


class SpecDecoder:
    def __init__(self, spec: SpeculativeConfig, eos_token_ids: Sequence[int],
                 proposer: Any = None) -> None:
        self.spec = spec
        self.k = spec.num_speculative_tokens
        self.eos_token_ids = list(eos_token_ids)
        self.proposer = proposer if proposer is not None else _NgramDrafts(spec)
        self.stats = SpecDecodeStats()
        self._draft_probs: dict[str, torch.Tensor] = {}    # request id -> [k, V] of its drafts

    # ---- after a step: the next drafts ---------------------------------------------------------
    def propose(self, reqs: Sequence[Request]) -> None:
        """Set spec_token_ids of each decoding request: at most k, and never more than its
        token budget can still take (the step emits the accepted drafts plus one token)."""
        todo, ks = [], []
        for r in reqs:
            self._draft_probs.pop(r.request_id, None)
            r.spec_token_ids = []
            if r.is_finished or r.num_computed_tokens != r.num_tokens - 1:
                continue
            k = self.k
            if r.max_tokens is not None:
                k = min(k, r.max_tokens - r.num_output_tokens - 1)
            if k > 0:
                todo.append(r)
                ks.append(k)
        if not todo:
            return
        for r, (tokens, probs) in zip(todo, self.proposer.propose(todo, ks)):
            r.spec_token_ids = list(tokens)
            if probs is not None and tokens:
                self._draft_probs[r.request_id] = probs

    def forget(self, req: Request) -> None:
        self._draft_probs.pop(req.request_id, None)
        self.proposer.forget(req)

    def observe(self, out: Any, result: Any) -> None:
        """After a step: the target's hidden states, for proposers that read them (EAGLE)."""
        observe = getattr(self.proposer, "observe", None)
        if observe is not None:
            observe(out, getattr(result, "hidden", None))

    # ---- in a step: verify ----------------------------------------------------------------------
    def verify(self, reqs: Sequence[Request], drafts: Sequence[list[int]], logits: torch.Tensor
               ) -> tuple[list[list[int]], list[list[dict | None]]]:
        """reqs[b] verified drafts[b] (non-empty) at logits rows [offset_b, offset_b + 1 +
        len(drafts[b])). Returns the tokens each request emits and their logprob entries."""
        states, rows_of = [], []
        for r, d in zip(reqs, drafts):
            start = len(states)
            for j in range(len(d) + 1):
                states.append(SamplingState(r.sampling_params, r.prompt_token_ids,
                                            [*r.output_token_ids, *d[:j]], r.generator,
                                            r.bad_words_token_ids))
            rows_of.append(range(start, len(states)))
        logits = logits.float()
        probs, greedy_rows = sampling_probs(logits, states, self.eos_token_ids)
        B, K, V = len(reqs), max(len(d) for d in drafts), logits.shape[1]
        greedy = torch.tensor([bool(greedy_rows[rows[0]]) for rows in rows_of])
        if bool(greedy.all()):
            emitted = _greedy_accept(probs, drafts, rows_of)
        else:
            target = probs.new_zeros(B, K + 1, V)
            draft_ids = torch.zeros(B, K, dtype=torch.int64)
            draft_probs = None
            if self._draft_probs:
                draft_probs = probs.new_zeros(B, K, V)
            uniform = torch.empty(B, K)
            noise = torch.ones(B, K + 1, V)
            for b, (r, d, rows) in enumerate(zip(reqs, drafts, rows_of)):
                target[b, :len(rows)] = probs[rows.start:rows.stop]
                draft_ids[b, :len(d)] = torch.tensor(d)
                q = self._draft_probs.get(r.request_id)
                if draft_probs is not None:
                    if q is not None:
                        draft_probs[b, :len(d)] = q[:len(d)].to(probs.device)
                    else:                         # point mass where no draft model gave probs
                        draft_probs[b, torch.arange(len(d)), draft_ids[b, :len(d)]] = 1.0
                if not bool(greedy[b]):
                    uniform[b].uniform_(generator=r.generator)
                    noise[b].exponential_(generator=r.generator)
            num = torch.tensor([len(d) for d in drafts])
            dev = probs.device                    # the kernel of the logits' device
            out = ops.rejection_sample(draft_ids.to(dev), num.to(dev), draft_probs, target,
                                       uniform.to(dev), noise.to(dev), greedy.to(dev)).cpu()
            emitted = [[t for t in row if t != PAD] for row in out.tolist()]
        logprobs: list[list[dict | None]] = []
        nums = [r.sampling_params.logprobs for r in reqs]
        raw = torch.log_softmax(logits, dim=-1) if any(n is not None for n in nums) else None
        for b, (r, d, rows) in enumerate(zip(reqs, drafts, rows_of)):
            tokens = emitted[b]
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(d)
            self.stats.num_accepted_tokens += len(tokens) - 1
            if raw is None or nums[b] is None:
                logprobs.append([None] * len(tokens))
                continue
            idx = torch.arange(rows.start, rows.start + len(tokens))
            logprobs.append(gather_logprobs(raw[idx], torch.tensor(tokens, dtype=torch.int64),
                                            [nums[b]] * len(tokens)))
        return emitted, logprobs


def _greedy_accept(probs: torch.Tensor, drafts: Sequence[list[int]],
                   rows_of: Sequence[range]) -> list[list[int]]:
    """Greedy rows keep each draft while it is the target's argmax, then emit the argmax."""
    best = probs.argmax(dim=-1).tolist()
    emitted = []
    for d, rows in zip(drafts, rows_of):
        tokens = []
        for j in range(len(d) + 1):
            tokens.append(best[rows.start + j])
            if j == len(d) or best[rows.start + j] != d[j]:
                break
        emitted.append(tokens)
    return emitted
