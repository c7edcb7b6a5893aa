"""EAGLE / MTP proposer: a one-layer head drafts from the target's own final hidden states
(an EAGLE-1 head of its own directory, or DeepSeek-V3's multi-token-prediction layer from the
target's checkpoint).

After every target step the engine hands over the hidden states of the positions the target
computed and kept (prompt chunks, the last token and the accepted drafts); they wait here until
the next proposal. Draft position j reads (token j + 1, target feature j), so a proposal first
runs the positions that gained a feature since the last one (the last of them yields the first
draft) and then decodes with its own output as the feature. The head's KV cache shares the
target's block tables (as the draft model's does); positions computed from its own features are
recomputed from the target's at the next proposal.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from octavo.config import EngineConfig
from octavo.request import Request
from octavo.scheduler import ScheduledRequest, SchedulerOutput

from .draft_model import RunnerProposer, draft_engine_config, pack_steps


class _ShiftedView:
    """The head's input tokens: position j holds token j + 1 of the request (then the drafts)."""

    def __init__(self, req: Request) -> None:
        self.request_id = req.request_id
        self.all_token_ids = list(req.all_token_ids[1:])
        self.block_ids = req.block_ids
        self.num_prompt_tokens = req.num_prompt_tokens
        self.prompt_logprobs = None
        self.lora_request = None
        self.state_slot = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class EagleProposer(RunnerProposer):
    def __init__(self, target: EngineConfig, target_runner: Any, head_dir: str,
                 method: str = "eagle") -> None:
        from octavo.model_runner import ModelRunner
        if method == "mtp":
            from octavo.models.deepseek_mtp import DeepSeekMTP as head_cls
        else:
            from octavo.models.eagle import EagleLlamaForCausalLM as head_cls

        self.config = draft_engine_config(target, head_dir)
        if self.config.hf_config.vocab_size != target.hf_config.vocab_size:
            raise ValueError(f"the EAGLE head {head_dir!r} has a vocabulary of "
                             f"{self.config.hf_config.vocab_size} tokens but the target has "
                             f"{target.hf_config.vocab_size}")
        if self.config.hf_config.hidden_size != target.hf_config.hidden_size:
            raise ValueError(f"the EAGLE head {head_dir!r} has hidden_size "
                             f"{self.config.hf_config.hidden_size} but the target has "
                             f"{target.hf_config.hidden_size}: it must read the target's "
                             "hidden states")
        self.runner = ModelRunner(self.config, model_cls=head_cls)
        self.runner.model.share_from(target_runner.model)
        self.runner.keep_hidden = True
        target_runner.keep_hidden = True
        self.budget = self.config.max_num_batched_tokens
        # request id -> (first position, [P, hidden]) of target features not yet consumed
        self._pending: dict[str, tuple[int, torch.Tensor]] = {}

    def forget(self, req: Request) -> None:
        self._pending.pop(req.request_id, None)

    def observe(self, out: SchedulerOutput, hidden: torch.Tensor | None) -> None:
        """Keep the target features of the positions each request now holds in its cache."""
        if hidden is None:
            return
        row = 0
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            kept = min(n, req.num_computed_tokens - s.start)   # the accepted prefix
            if kept > 0 and not req.is_finished:
                feats = hidden[row:row + kept]
                first, old = self._pending.get(req.request_id, (s.start, None))
                if old is not None and first + old.shape[0] == s.start:
                    self._pending[req.request_id] = (first, torch.cat([old, feats]))
                else:                             # new, or recomputed after preemption
                    self._pending[req.request_id] = (s.start, feats.clone())
            row += n

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Request], ks: Sequence[int]):
        head = self.runner.model
        items, views, feats_of, todo_k = [], {}, {}, {}
        for i, (r, k) in enumerate(zip(reqs, ks)):
            first, feats = self._pending.get(r.request_id, (0, None))
            end = r.num_computed_tokens              # features cover [first, end)
            if feats is None or first + feats.shape[0] != end:
                continue
            # positions the head's cache lacks: from its last target-fed position, or where the
            # features start (a prefix-cache hit: the cached blocks hold the head's K/V too)
            start = max(min(r.num_draft_computed, end - 1), first)
            if not self.kv.allocate(r, 1 + k):
                continue
            views[i] = _ShiftedView(r)
            feats_of[i] = feats[start - first:]
            todo_k[i] = k
            items.append((i, start, end - start))
            self._pending.pop(r.request_id)
        tokens: dict[int, list[int]] = {i: [] for i in views}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in views}
        last_hidden: dict[int, torch.Tensor] = {}
        logits_of = self._catch_up(items, views, feats_of, last_hidden)
        for step in range(max(todo_k.values(), default=0)):
            live = [i for i in views if step < todo_k[i]]
            if step > 0:
                out = SchedulerOutput([ScheduledRequest(views[i], 1, views[i].num_tokens - 1)
                                       for i in live])
                head.features = torch.stack([last_hidden[i] for i in live])
                res = self.runner.execute(out)
                logits_of = dict(zip(live, res.logits))
                last_hidden.update(zip(live, res.hidden))
            drafts = self.sample_drafts(live, torch.stack([logits_of[i] for i in live]), reqs,
                                        tokens, probs)
            for i, t in zip(live, drafts):
                views[i].all_token_ids.append(t)
        for i in views:      # the head's cache is target-fed up to the last token's position
            reqs[i].num_draft_computed = reqs[i].num_computed_tokens
        return self.results(len(reqs), tokens, probs)

    def _catch_up(self, items, views, feats_of, last_hidden) -> dict[int, torch.Tensor]:
        """Run positions [start, start + n) of each view with the target's features, in steps
        of at most the token budget; the last position's logits and hidden state of each."""
        head = self.runner.model
        logits_of: dict[int, torch.Tensor] = {}
        pending = list(items)
        while pending:
            batch, pending = pack_steps(pending, self.budget, self.config.max_num_seqs)
            head.features = torch.cat([feats_of[i][:take] for i, _, take in batch])
            for i, _, take in batch:
                feats_of[i] = feats_of[i][take:]
            out = SchedulerOutput([ScheduledRequest(views[i], take, start)
                                   for i, start, take in batch])
            res = self.runner.execute(out)
            row, done = 0, []
            for i, start, take in batch:
                row += take
                if start + take == views[i].num_tokens:
                    done.append(i)
                    last_hidden[i] = res.hidden[row - 1]
            if done:
                logits_of.update(zip(done, res.logits))
        return logits_of
