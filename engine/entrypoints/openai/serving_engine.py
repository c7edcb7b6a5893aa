"""What every endpoint shares: the engine, the served model names, the tokenizer, OpenAI's error
shape, prompt checks, and turning engine outputs into per-choice deltas."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi.responses import StreamingResponse

from octavo.async_engine import AsyncLLMEngine, EngineDeadError
from octavo.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from octavo.sampling_params import SamplingParams

from .protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error answered with OpenAI's error shape and an HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             405: "MethodNotAllowedError", 413: "RequestTooLargeError",
             415: "UnsupportedMediaTypeError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def response(self) -> ErrorResponse:
        return error_response(self.message, self.status, self.param)


def error_response(message: str, status: int, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=APIError.TYPES.get(
        status, "BadRequestError"), param=param, code=status))


def error_status(e: BaseException) -> int:
    """The HTTP status of an error met while serving: 503 when the engine is dead."""
    return 503 if isinstance(e, EngineDeadError) else 500


def sse(payload: Any) -> str:
    """One server-sent event carrying a pydantic model or a plain object as JSON."""
    body = payload.model_dump_json(exclude_unset=False) if hasattr(payload, "model_dump_json") \
        else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEStream(StreamingResponse):
    """A server-sent-event reply that aborts its engine requests however it ends: a stream the
    client left before its first chunk never runs its generator's cleanup."""

    def __init__(self, chunks: AsyncIterator[str], engine: AsyncLLMEngine,
                 request_ids: list[str]) -> None:
        super().__init__(chunks, media_type="text/event-stream")
        self._engine, self._request_ids = engine, request_ids

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for rid in self._request_ids:      # a no-op for requests that finished
                self._engine.abort(rid)


@dataclass
class ServerContext:
    """The state the endpoints share (one per server)."""
    engine: AsyncLLMEngine
    served_model_names: list[str]
    model_path: str
    # A tokenizer of the server's own: the engine thread's one is not shared across threads.
    tokenizer: Any
    chat_template: str | None = None
    # --trust-request-chat-template: a request's own template is a program the server runs.
    trust_request_chat_template: bool = False
    response_role: str = "assistant"            # --response-role: the role of the replies
    # LoRA adapters served under their own model names (--lora-modules, /v1/load_lora_adapter)
    lora_requests: dict[str, Any] = field(default_factory=dict)

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.vocab_size

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names \
                and name not in self.lora_requests:
            raise APIError(f"The model `{name}` does not exist: this server serves "
                           f"{self.served_model_names + list(self.lora_requests)}.", 404, "model")

    def lora_for(self, name: str | None) -> Any:
        """The LoRARequest a request's "model" names, or None for the base model."""
        return self.lora_requests.get(name) if name is not None else None

    def default_params(self) -> SamplingParams:
        return self.engine.engine.get_default_sampling_params()

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM's rule: the prompt plus the asked-for tokens must fit in the context."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens, but the "
                           f"prompt has {num_prompt_tokens} tokens, which leaves no room to "
                           "generate: shorten the prompt.", 400, "prompt")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, "
                           f"you requested {num_prompt_tokens + max_tokens} tokens "
                           f"({num_prompt_tokens} in the prompt, {max_tokens} for the "
                           "completion): reduce the prompt or max_tokens.", 400, "max_tokens")

    async def add_all(self, request_id: str, prompts: Sequence[dict], params: SamplingParams,
                      lora_request: Any = None) -> list[tuple[str, asyncio.Queue]]:
        """Add one engine request per prompt; if one is refused, abort those added and raise
        a 400 naming it."""
        added: list[tuple[str, asyncio.Queue]] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = f"{request_id}-{i}"
                added.append((rid, await self.engine.add_request(rid, prompt, params,
                                                                 lora_request=lora_request)))
        except ValueError as e:
            for rid, _ in added:
                self.engine.abort(rid)
            where = f"prompt {len(added)}: " if len(prompts) > 1 else ""
            raise APIError(f"{where}{e}", 400) from e
        except BaseException:
            for rid, _ in added:
                self.engine.abort(rid)
            raise
        return added


async def merge_streams(engine: AsyncLLMEngine, added: list[tuple[str, asyncio.Queue]]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests as they come. Leaving early (a client
    that went away) aborts every request still running."""
    merged: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, rid: str, q: asyncio.Queue) -> None:
        try:
            async for out in engine.stream_outputs(rid, q):
                await merged.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await merged.put((i, e))
        await merged.put((i, done))

    tasks = [asyncio.create_task(pump(i, rid, q)) for i, (rid, q) in enumerate(added)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await merged.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class ChoiceState:
    """What one choice has sent so far while streaming."""

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.finished = False

    def delta(self, c: CompletionOutput, params: SamplingParams) -> tuple[str, int, int]:
        """(new text, first new token, end token) since the last call. Text that could still
        turn out to be the start of a stop string is held back until it cannot."""
        text = visible_text(c, params)
        new_text = text[self.text_len:]
        start, end = self.num_tokens, len(c.token_ids)
        self.text_len, self.num_tokens = max(self.text_len, len(text)), end
        self.finished = c.finish_reason is not None
        return new_text, start, end


def prompt_logprobs_json(entries: PromptLogprobs | None) -> list | None:
    if entries is None:
        return None
    return [None if e is None else
            {tok: {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                   "decoded_token": lp.decoded_token} for tok, lp in e.items()}
            for e in entries]


def visible_text(c: CompletionOutput, params: SamplingParams) -> str:
    if c.finish_reason is not None:
        return c.text
    return c.text[:max(0, len(c.text) - params.output_text_buffer_length)]
