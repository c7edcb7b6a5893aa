"""/v1/completions: prompts as text or token ids, n choices each, echo, logprobs, SSE streaming."""
from __future__ import annotations

from typing import AsyncIterator

from octavo.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs
from octavo.sampling_params import SamplingParams

from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, UsageInfo, random_id)
from .serving_engine import (SSE_DONE, APIError, ChoiceState, ServerContext, SSEStream,
                             error_status, merge_streams, prompt_logprobs_json, sse,
                             visible_text)


class OpenAIServingCompletion:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest) -> CompletionResponse | SSEStream:
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.suffix is not None:
            raise APIError("suffix is not supported: leave it out", 400, "suffix")
        prompts = [self._encode(p, req) for p in _prompt_list(req.prompt)]
        for p in prompts:
            ctx.check_length(len(p["prompt_token_ids"]), req.max_tokens)
        try:
            req.check_stream_fields()
            params = req.sampling_params(ctx.default_params(), req.max_tokens, req.logprobs)
            if req.echo and req.logprobs is not None:
                params.prompt_logprobs = req.logprobs
        except ValueError as e:
            raise APIError(str(e), 400) from e
        request_id = random_id("cmpl")
        lora = ctx.lora_for(req.model)
        added = await ctx.add_all(request_id, prompts, params, lora_request=lora)
        run = _Run(req.model if lora is not None else ctx.model_name, request_id, req, params,
                   prompts)
        if req.stream:
            return SSEStream(run.stream(merge_streams(ctx.engine, added)), ctx.engine,
                             [rid for rid, _ in added])
        finals: dict[int, RequestOutput] = {}
        async for i, out in merge_streams(ctx.engine, added):
            finals[i] = out
        return run.response([finals[i] for i in range(len(prompts))])

    def _encode(self, prompt: str | list[int], req: CompletionRequest) -> dict:
        tok = self.ctx.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=req.add_special_tokens)
            return {"prompt": prompt, "prompt_token_ids": ids}
        if not prompt:
            raise APIError("a prompt of token ids is empty: give at least one token", 400,
                           "prompt")
        vocab = self.ctx.vocab_size             # checked before the tokenizer sees them
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {vocab})", 400, "prompt")
        return {"prompt": tok.decode(prompt), "prompt_token_ids": list(prompt)}


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt is an empty list: give a string, strings or token ids", 400,
                       "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


class _Run:
    """One completion request's id, settings and prompts, shaping engine outputs into replies."""

    def __init__(self, model: str, request_id: str, req: CompletionRequest,
                 params: SamplingParams, prompts: list[dict]) -> None:
        self.model, self.id, self.req, self.params, self.prompts = (
            model, request_id, req, params, prompts)
        self.n = params.n

    def usage(self, outputs: list[RequestOutput | None]) -> UsageInfo:
        prompt = sum(len(p["prompt_token_ids"]) for p in self.prompts)
        completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                text, logprobs = self._choice_text(out, c, 0, len(c.token_ids), True, c.text)
                choices.append(CompletionChoice(
                    index=i * self.n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(
                        out.prompt_logprobs if self.req.prompt_logprobs is not None else None)))
        return CompletionResponse(id=self.id, model=self.model, choices=choices,
                                  usage=self.usage(outputs))

    async def stream(self, outputs) -> AsyncIterator[str]:
        states: dict[tuple[int, int], ChoiceState] = {}
        last: list[RequestOutput | None] = [None] * len(self.prompts)
        try:
            async for i, out in outputs:
                last[i] = out
                for c in out.outputs:
                    state = states.setdefault((i, c.index), ChoiceState())
                    if state.finished:
                        continue
                    first = state.num_tokens == 0 and state.text_len == 0
                    new_text, start, end = state.delta(c, self.params)
                    if not new_text and not state.finished and not (first and self.req.echo):
                        state.num_tokens = start   # send these tokens' logprobs with the text
                        continue
                    text, logprobs = self._choice_text(out, c, start, end, first, new_text)
                    yield sse(CompletionResponse(id=self.id, model=self.model, choices=[
                        CompletionChoice(index=i * self.n + c.index, text=text,
                                         logprobs=logprobs, finish_reason=c.finish_reason,
                                         stop_reason=c.stop_reason)]))
            if self.req.include_usage:
                yield sse(CompletionResponse(id=self.id, model=self.model, choices=[],
                                             usage=self.usage(last)))
        except APIError as e:
            yield sse(e.response())
        except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band
            yield sse(APIError(str(e), error_status(e)).response())
        yield SSE_DONE

    def _choice_text(self, out: RequestOutput, c: CompletionOutput, start: int, end: int,
                     with_echo: bool, text: str) -> tuple[str, CompletionLogprobs | None]:
        echo = self.req.echo and with_echo
        prefix = (out.prompt or "") if echo else ""
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = CompletionLogprobs()
            offset = len(prefix) if echo else 0
            if echo:
                offset = _add_prompt_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs)
                offset = max(offset, len(prefix))
            else:
                offset = len(visible_text(c, self.params)) - len(text)
            _add_logprobs(logprobs, c.token_ids[start:end], (c.logprobs or [])[start:end],
                          offset)
        return prefix + text, logprobs


def _add_prompt_logprobs(dst: CompletionLogprobs, token_ids: list[int] | None,
                         entries: PromptLogprobs | None) -> int:
    """Prompt tokens' logprobs (echo): the first prompt token has none. Returns the offset."""
    offset = 0
    for tok, entry in zip(token_ids or [], entries or []):
        if entry is None or tok not in entry:
            dst.tokens.append("")
            dst.token_logprobs.append(None)
            dst.top_logprobs.append(None)
            dst.text_offset.append(offset)
            continue
        _append(dst, tok, entry, offset)
        offset += len(entry[tok].decoded_token or "")
    return offset


def _add_logprobs(dst: CompletionLogprobs, token_ids: list[int], entries: SampleLogprobs,
                  offset: int) -> None:
    for tok, entry in zip(token_ids, entries):
        _append(dst, tok, entry, offset)
        offset += len(entry[tok].decoded_token or "")


def _append(dst: CompletionLogprobs, tok: int, entry: dict, offset: int) -> None:
    lp = entry[tok]
    dst.tokens.append(lp.decoded_token or "")
    dst.token_logprobs.append(max(lp.logprob, -9999.0))
    top: dict[str, float] = {}
    for e in sorted(entry.values(), key=lambda e: e.rank or 0):
        # Tokens can share a text (byte-fallback pieces all show as U+FFFD): the likelier wins.
        top.setdefault(e.decoded_token or "", max(e.logprob, -9999.0))
    dst.top_logprobs.append(top)
    dst.text_offset.append(offset)
