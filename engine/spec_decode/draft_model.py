"""Draft-model proposer: a smaller model with the target's vocabulary guesses k tokens, one
forward per token, for every decoding request at once.

The draft has a KV cache of its own with as many blocks as the target's and reads the same
block tables, so the target's block bookkeeping (allocation, prefix sharing, freeing,
preemption) covers it too. Per request it remembers how many leading positions its cache holds
(`num_draft_computed`); a proposal first computes the positions it lacks (the whole prompt the
first time, afterwards the one or two tokens the last verification added) and then decodes.
Drafts the target rejected leave stale draft K/V past that count, which is written over later.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from octavo.config import EngineConfig
from octavo.request import Request
from octavo.sampler import SamplingState, sampling_probs
from octavo.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


class _DraftView:
    """What the draft's runner reads of a request: its tokens plus the drafts so far."""

    def __init__(self, req: Request) -> None:
        self.request_id = req.request_id
        self.all_token_ids = list(req.all_token_ids)
        self.block_ids = req.block_ids
        self.num_prompt_tokens = req.num_prompt_tokens
        self.prompt_logprobs = None
        self.lora_request = None
        self.state_slot = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def draft_engine_config(target: EngineConfig, draft_model: str) -> EngineConfig:
    """The draft's EngineConfig: the target's shapes (block size, budgets, max_model_len, dtype
    and device), one process, eager, no LoRA, no speculation of its own."""
    from octavo.llm_engine import _load_hf_config

    cfg = EngineConfig(model=draft_model, dtype=target.torch_dtype, device=target.device,
                       max_model_len=target.max_model_len, max_num_seqs=target.max_num_seqs,
                       max_num_batched_tokens=target.max_num_batched_tokens,
                       block_size=target.block_size, enforce_eager=True,
                       trust_remote_code=target.trust_remote_code,
                       kv_cache_memory=target.kv_cache_memory, seed=target.seed)
    cfg.resolve(_load_hf_config(cfg))
    return cfg


def pack_steps(pending: list[tuple[int, int, int]], budget: int, max_seqs: int
               ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(item, start, n) positions still to run -> (this step's (item, start, take) within the
    token budget and sequence limit, what is left for later steps)."""
    batch, rest = [], []
    for i, start, n in pending:
        take = min(n, budget)
        if take <= 0 or len(batch) >= max_seqs:
            rest.append((i, start, n))
            continue
        batch.append((i, start, take))
        budget -= take
        if take < n:
            rest.append((i, start + take, n - take))
    return batch, rest


class RunnerProposer:
    """What the proposers that run a model of their own share: a runner whose cache has the
    target's block count, and turning that model's logits into drafts."""

    runner: Any
    kv: Any = None                          # the target's KVCacheManager (bind)
    eos_token_ids: list[int] = []

    def bytes_per_block(self) -> int:
        return self.runner.bytes_per_block()

    def bind(self, kv: Any, num_blocks: int, eos_token_ids: Sequence[int]) -> None:
        """Allocate the cache with the target's block count; `kv` hands out blocks."""
        self.kv = kv
        self.eos_token_ids = list(eos_token_ids)
        self.runner._allocate(num_blocks)
        self.runner.num_blocks = num_blocks

    def forget(self, req: Request) -> None:
        pass

    def sample_drafts(self, live: list[int], rows: torch.Tensor, reqs: Sequence[Request],
                      tokens: dict[int, list[int]], probs: dict[int, list[torch.Tensor]]
                      ) -> list[int]:
        """One draft per live request from the logits rows [len(live), V], drawn from the
        request's own sampling distribution (greedy: its argmax; else the distribution is kept
        for the rejection sampler). Appends to tokens / probs; returns the drafts."""
        states = [SamplingState(reqs[i].sampling_params, reqs[i].prompt_token_ids,
                                [*reqs[i].output_token_ids, *tokens[i]], reqs[i].generator,
                                reqs[i].bad_words_token_ids) for i in live]
        q, greedy = sampling_probs(rows, states, self.eos_token_ids)
        out = []
        for j, i in enumerate(live):
            if bool(greedy[j]):
                t = int(q[j].argmax())
            else:
                t = int(torch.multinomial(q[j], 1, generator=reqs[i].generator))
                probs[i].append(q[j])
            tokens[i].append(t)
            out.append(t)
        return out

    @staticmethod
    def results(n: int, tokens: dict[int, list[int]], probs: dict[int, list[torch.Tensor]]):
        return [(tokens.get(i, []), torch.stack(probs[i]) if probs.get(i) else None)
                for i in range(n)]


class DraftModelProposer(RunnerProposer):
    def __init__(self, target: EngineConfig, draft_model: str) -> None:
        from octavo.model_runner import ModelRunner

        self.config = draft_engine_config(target, draft_model)
        draft_vocab = self.config.hf_config.vocab_size
        if draft_vocab != target.hf_config.vocab_size:
            raise ValueError(f"the draft model {draft_model!r} has a vocabulary of {draft_vocab} "
                             f"tokens but the target has {target.hf_config.vocab_size}: a draft "
                             "must share the target's tokenizer")
        self.runner = ModelRunner(self.config)
        if self.runner.state_layers:
            raise ValueError(f"the draft model {draft_model!r} keeps a recurrent state (Mamba "
                             "layers), which octavo does not support as a draft")
        self.budget = self.config.max_num_batched_tokens

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Request], ks: Sequence[int]):
        """(draft tokens, their draft probabilities [k, V] or None for greedy requests) per
        request. A request the pool cannot give blocks for its drafts gets none."""
        views, todo_k = [], []
        for r, k in zip(reqs, ks):
            # blocks for positions up to num_tokens - 1 + k: the drafts' K/V here, and the
            # verification step's (the scheduler then finds them allocated)
            if not self.kv.allocate(r, 1 + k):
                views.append(None)
                todo_k.append(0)
                continue
            views.append(_DraftView(r))
            todo_k.append(k)
        active = [i for i, v in enumerate(views) if v is not None]
        tokens: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        # 1. catch up: the positions the draft's cache lacks; the last one's logits give draft 1
        starts = {i: min(reqs[i].num_draft_computed, reqs[i].num_computed_tokens) for i in active}
        logits_of = self._catch_up([(i, views[i], starts[i]) for i in active])
        for step in range(max(todo_k, default=0)):
            live = [i for i in active if step < todo_k[i]]
            if not live:
                break
            if step > 0:                          # one more token each: the previous draft
                out = SchedulerOutput([ScheduledRequest(views[i], 1, views[i].num_tokens - 1)
                                       for i in live])
                res = self.runner.execute(out)
                logits_of = dict(zip(live, res.logits))
            drafts = self.sample_drafts(live, torch.stack([logits_of[i] for i in live]), reqs,
                                        tokens, probs)
            for i, t in zip(live, drafts):
                views[i].all_token_ids.append(t)
        for i in active:
            # positions written: all tokens before the last draft (which no forward consumed)
            reqs[i].num_draft_computed = views[i].num_tokens - 1
        return self.results(len(reqs), tokens, probs)

    def _catch_up(self, items: list[tuple[int, _DraftView, int]]) -> dict[int, torch.Tensor]:
        """Forward each view's positions [start, num_tokens), packed into steps of at most the
        token budget (a long prompt in chunks); returns each one's last-position logits."""
        logits_of: dict[int, torch.Tensor] = {}
        views = {i: v for i, v, _ in items}
        pending = [(i, start, v.num_tokens - start) for i, v, start in items]
        while pending:
            batch, pending = pack_steps(pending, self.budget, self.config.max_num_seqs)
            res = self.runner.execute(SchedulerOutput(
                [ScheduledRequest(views[i], n, start) for i, start, n in batch]))
            done = [i for i, start, n in batch if start + n == views[i].num_tokens]
            if done:
                logits_of.update(zip(done, res.logits))
        return logits_of
