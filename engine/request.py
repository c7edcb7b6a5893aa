"""Request: one sequence's state as the scheduler, KV cache and runner see it."""
from __future__ import annotations

import enum
import time
from typing import Any

import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """Tokens known so far (prompt + output) and how many of them are in the KV cache.

    `num_computed_tokens` catches up with `num_tokens`; the scheduler decides how fast.
    `block_ids` is the block table; `block_hashes[i]` identifies full block i for prefix caching.
    `state_slot` is its slot in the per-request state of models with one (Mamba).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any,
                 eos_token_ids: tuple[int, ...] = (), prompt: str | None = None,
                 max_model_len: int | None = None, index: int = 0,
                 lora_request: Any = None) -> None:
        self.request_id = request_id
        self.lora_request = lora_request     # octavo.lora.LoRARequest, or None: the base model
        self.index = index                   # which of the parent request's n samples
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1          # prefix-cache hit of the first scheduling
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[Any] = []
        self.state_slot: int | None = None   # state slot of the Mamba layers while running
        # speculative decoding: draft tokens to verify in the next step (after all_token_ids),
        # and how many leading tokens the draft model's KV cache holds
        self.spec_token_ids: list[int] = []
        self.num_draft_computed = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.max_tokens = sampling_params.max_tokens
        if max_model_len is not None:
            room = max(1, max_model_len - len(self.prompt_token_ids))
            self.max_tokens = room if self.max_tokens is None else min(self.max_tokens, room)
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)
        self.bad_words_token_ids: list[list[int]] | None = None
        # filled by the engine's output side
        self.detokenizer: Any = None
        self.logprobs: list[dict] | None = [] if sampling_params.logprobs is not None else None
        self.prompt_logprobs: list[dict | None] | None = (
            [None] if sampling_params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.name})")
