"""Token-budget scheduler: no prefill or decode phase, only requests catching up on tokens.

Each step spends at most `max_num_batched_tokens` tokens: first on running requests (in arrival
order), then on waiting ones. A long prompt is cut into chunks (chunked prefill); a request whose
KV blocks cannot be found preempts the most recently admitted running request, which frees its
blocks and is recomputed later (recompute preemption).

With speculative decoding a decoding request also carries draft tokens (`spec_token_ids`): they
are scheduled after its last token, so one forward scores them all, and `update` takes back
the positions of the drafts the rejection sampler refused (their KV slots are simply written
again later; prefix-cache hashes only ever cover accepted tokens).

Models with a per-request state start a request from a state snapshot of its leading tokens
when the KV manager has one (see kv_cache.py), as attention models start from cached blocks.
`n > 1` forks: the first child computes the prompt but its last token, its state is copied to
a snapshot, and only then do its siblings (held until that moment) join and start from it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int                      # first position computed this step
    spec_token_ids: list[int] = field(default_factory=list)   # drafts after the last token

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so its logits are due
        (at 1 + len(spec_token_ids) rows: the last token's and each draft's)."""
        return self.start + self.num_new_tokens == self.request.num_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # (from slot, to slot), (from block, to block): state snapshots taken and restored, and
    # the partial K/V blocks of restored ones; the runner copies them before this step's forward
    state_copies: list[tuple[int, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None) -> None:
        self.kv = kv
        self.max_loras = max_loras           # distinct LoRA adapters running at once (slots)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0        # tokens computed over all steps (a work counter)
        # n > 1 forks: first child's id -> (its fork point, the siblings it holds back);
        # held sibling's id -> first child's id
        self.forks: dict[str, tuple[int, list[Request]]] = {}
        self.held: dict[str, str] = {}

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def add_forked(self, children: list[Request]) -> None:
        """The n children of one prompt: the first runs alone to the prompt's last token, its
        state is snapshotted, then the others start from that snapshot (see update)."""
        first, rest = children[0], children[1:]
        if (not rest or not self.kv.state_snapshots or first.num_tokens < 2
                or first.sampling_params.prompt_logprobs is not None):   # those restore none
            for req in children:
                self.add_request(req)
            return
        self.forks[first.request_id] = (first.num_tokens - 1, rest)
        for req in rest:
            self.held[req.request_id] = first.request_id
        self.add_request(first)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:               # admitting new work right after preempting thrashes
            self._schedule_waiting(out, budget)
        out.state_copies, out.block_copies = self.kv.take_copies()
        self.num_scheduled_tokens += out.num_batched_tokens
        return out

    def _end(self, req: Request) -> int:
        """Where the request's computing stops this time: its last token (then it samples), or
        its fork point."""
        fork = self.forks.get(req.request_id)
        return req.num_tokens if fork is None else fork[0]

    def _release_fork(self, req: Request) -> None:
        """The first child reached its fork point (or finished): its siblings wait first in
        line, and find its state snapshot when admitted."""
        _, rest = self.forks.pop(req.request_id)
        for sib in reversed(rest):
            del self.held[sib.request_id]
            self.waiting.appendleft(sib)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            left = self._end(req) - req.num_computed_tokens
            n = min(left + len(req.spec_token_ids), budget)
            while not self.kv.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    return budget
            spec = req.spec_token_ids[:max(0, n - left)]      # the drafts the budget holds
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens, spec))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bs = self.kv.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not self._lora_fits(req):     # waits for a running adapter's requests to finish
                break
            cached = self.kv.find_cached_prefix(req)
            num_hit = len(cached) * bs
            snapshot = self.kv.find_state_snapshot(req)
            if snapshot is not None:
                num_hit = snapshot[1]
            fork = self.forks.get(req.request_id)
            if fork is not None and num_hit >= fork[0]:      # already known: no fork step
                self.waiting.popleft()
                self._release_fork(req)
                self.waiting.appendleft(req)
            n = min(self._end(req) - num_hit, budget)
            if not self.kv.allocate(req, n, cached,
                                    None if snapshot is None else snapshot[0]):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, num_hit))
            budget -= n

    def _lora_fits(self, req: Request) -> bool:
        """Every running request is in each step, so the running set may use at most
        max_loras distinct adapters (one device slot each)."""
        lora = getattr(req, "lora_request", None)
        if lora is None or self.max_loras is None:
            return True
        active = {r.lora_request.lora_int_id for r in self.running
                  if getattr(r, "lora_request", None) is not None}
        return lora.lora_int_id in active or len(active) < self.max_loras

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_draft_computed = 0
        if req.prompt_logprobs is not None:     # the prompt is recomputed: collect them anew
            req.prompt_logprobs = [None]
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput,
               sampled: dict[str, int | list[int]]) -> list[tuple[Request, list[int]]]:
        """Advance the scheduled requests by what was computed, append the sampled tokens and
        finish requests that hit EOS, a stop token id or their length limit. A request may get
        several tokens (speculative decoding: its accepted drafts, then one more); the KV
        positions of its rejected drafts are given back. Returns each request that received
        tokens with the tokens appended (cut at the one that finished it)."""
        updated = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:                  # aborted while its step ran
                continue
            tokens = sampled.get(req.request_id)
            if isinstance(tokens, int):
                tokens = [tokens]
            # drafts are positions past num_tokens; those not accepted hold no valid K/V
            accepted = max(0, len(tokens) - 1) if tokens and s.spec_token_ids else 0
            req.num_computed_tokens = s.start + s.num_new_tokens - (len(s.spec_token_ids) - accepted)
            req.spec_token_ids = []
            self.kv.cache_full_blocks(req)
            fork = self.forks.get(req.request_id)
            if fork is not None and req.num_computed_tokens >= fork[0]:
                self.kv.snapshot_state(req)       # if no slot is spare, the siblings recompute
                self._release_fork(req)
            if not tokens:
                continue
            appended = []
            for token in tokens:
                req.append_token(token)
                appended.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    self.finish_request(req, status)
                    break
            updated.append((req, appended))
        return updated

    @staticmethod
    def _check_stop(req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.max_tokens is not None and req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        if req.is_finished:
            return
        if req.request_id in self.forks:          # its siblings go on without a snapshot
            self._release_fork(req)
        first = self.held.pop(req.request_id, None)
        if first is not None:                     # held back by its first sibling: not queued
            self.forks[first][1].remove(req)
        elif req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        # a finished request's state covers its computed tokens: kept as a snapshot
        self.kv.free(req, keep_state=status != RequestStatus.FINISHED_ABORTED)
        req.status = status
