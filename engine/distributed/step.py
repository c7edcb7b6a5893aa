"""A scheduled step as plain data, pickled once and sent to every worker, and the worker's answer
turned back into the engine's StepOutput."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from octavo.scheduler import ScheduledRequest, SchedulerOutput


class _Window:
    """The tokens [start, end) of a request, indexable with the absolute positions the runner
    uses (so a step carries only its new tokens, not the whole sequence)."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, s: slice) -> list[int]:
        return self.tokens[s.start - self.start:s.stop - self.start]


@dataclass
class WireRequest:
    """What the runner reads of a Request for one step."""
    request_id: str
    all_token_ids: _Window
    num_tokens: int
    block_ids: list[int]
    num_prompt_tokens: int
    prompt_logprobs: int | None
    prompt_token_ids: _Window | None       # only when prompt logprobs are asked for
    state_slot: int | None = None          # the request's Mamba state slot (state models)


@dataclass
class WireStep:
    """A step's requests, and the state / K/V block copies (snapshots taken and restored) that
    every rank runs on its own cache before the forward. The copies are row copies of slots and
    blocks, so they apply unchanged to each rank's share (TP: the whole Mamba state, replicated,
    and the rank's KV heads of each block)."""
    requests: list[tuple[WireRequest, int, int, list[int]]]
    state_copies: list[tuple[int, int]]
    block_copies: list[tuple[int, int]]


def to_wire(out: SchedulerOutput) -> WireStep:
    steps = []
    for s in out.scheduled:
        r, end = s.request, s.start + s.num_new_tokens - len(s.spec_token_ids)
        prompt = None
        if r.prompt_logprobs is not None:  # targets are the next prompt tokens
            hi = min(end + 1, r.num_prompt_tokens)
            prompt = _Window(s.start, list(r.prompt_token_ids[s.start:hi]))
        steps.append((WireRequest(r.request_id, _Window(s.start, list(r.all_token_ids[s.start:end])),
                                  r.num_tokens, list(r.block_ids), r.num_prompt_tokens,
                                  r.prompt_logprobs, prompt, getattr(r, "state_slot", None)),
                      s.num_new_tokens, s.start,
                      list(s.spec_token_ids)))
    return WireStep(steps, list(out.state_copies), list(out.block_copies))


def from_wire(wire: WireStep) -> SchedulerOutput:
    return SchedulerOutput([ScheduledRequest(r, n, start, spec)
                            for r, n, start, spec in wire.requests],
                           state_copies=list(wire.state_copies),
                           block_copies=list(wire.block_copies))


@dataclass
class WorkerResult:
    """The last pipeline stage's logits, as numpy (pickled by value, not shared memory)."""
    logits: np.ndarray | None                        # [R, vocab] float32 (see StepOutput)
    prompt_logits: list[tuple[int, np.ndarray, list[int]]]   # (index in step, [P, vocab], targets)


def result_of(out: SchedulerOutput, step_output) -> WorkerResult:
    index = {id(s.request): i for i, s in enumerate(out.scheduled)}
    logits = None if step_output.logits is None else step_output.logits.cpu().numpy()
    return WorkerResult(logits, [(index[id(r)], t.cpu().numpy(), list(targets))
                                 for r, t, targets in step_output.prompt_logits])


def to_step_output(out: SchedulerOutput, result: WorkerResult):
    from octavo.model_runner import StepOutput
    reqs = [s.request for s in out.scheduled]
    # (arrays that come out of Ray's object store are read-only views: copied, not shared)
    logits = None if result.logits is None else torch.from_numpy(np.require(result.logits,
                                                                           requirements="W"))
    return StepOutput([s.request for s in out.scheduled if s.samples], logits,
                      [(reqs[i], torch.from_numpy(np.require(t, requirements="W")), targets)
                       for i, t, targets in result.prompt_logits])
