"""/v1/chat/completions: messages through the chat template, n choices, logprobs, SSE streaming."""
from __future__ import annotations

from typing import AsyncIterator

from octavo.chat_utils import apply_chat_template
from octavo.outputs import RequestOutput, SampleLogprobs
from octavo.sampling_params import SamplingParams

from .protocol import (ChatChoice, ChatCompletionRequest, ChatLogprobs, ChatMessage,
                       ChatResponse, ChatStreamChoice, ChatStreamResponse, DeltaMessage,
                       TokenLogprob, TopLogprob, UsageInfo, random_id)
from .serving_engine import (SSE_DONE, APIError, ChoiceState, ServerContext, SSEStream,
                             error_status, merge_streams, prompt_logprobs_json, sse)

# OpenAI's limit on top_logprobs.
_MAX_TOP_LOGPROBS = 20


class OpenAIServingChat:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def render(self, req: ChatCompletionRequest) -> dict:
        """The templated prompt and its token ids (ValueError -> 400)."""
        ctx = self.ctx
        if req.chat_template is not None and not ctx.trust_request_chat_template:
            raise APIError("chat_template in a request is refused: this server renders only its "
                           "own template (start it with --trust-request-chat-template to allow "
                           "request templates)", 400, "chat_template")
        try:
            text = apply_chat_template(
                ctx.tokenizer, req.messages, chat_template=req.chat_template or ctx.chat_template,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, tools=req.tools,
                chat_template_kwargs=req.chat_template_kwargs)
        except ValueError as e:
            raise APIError(str(e), 400, "messages") from e
        ids = ctx.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return {"prompt": text, "prompt_token_ids": ids}

    async def create(self, req: ChatCompletionRequest) -> ChatResponse | SSEStream:
        ctx = self.ctx
        ctx.check_model(req.model)
        _check_unsupported(req)
        prompt = self.render(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        ctx.check_length(len(prompt["prompt_token_ids"]), max_tokens)
        try:
            req.check_stream_fields()
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            params = req.sampling_params(ctx.default_params(), max_tokens, logprobs)
        except ValueError as e:
            raise APIError(str(e), 400) from e
        request_id = random_id("chatcmpl")
        lora = ctx.lora_for(req.model)
        added = await ctx.add_all(request_id, [prompt], params, lora_request=lora)
        run = _ChatRun(req.model if lora is not None else ctx.model_name, request_id, req, params,
                       len(prompt["prompt_token_ids"]), ctx.response_role)
        if req.stream:
            return SSEStream(run.stream(merge_streams(ctx.engine, added)), ctx.engine,
                             [rid for rid, _ in added])
        final = None
        async for _, out in merge_streams(ctx.engine, added):
            final = out
        return run.response(final)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", 400, "top_logprobs")
        if not 0 <= req.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got "
                           f"{req.top_logprobs}", 400, "top_logprobs")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise APIError("response_format other than {'type': 'text'} (structured output) is not "
                       "supported: leave it out", 400, "response_format")
    if req.tool_choice not in (None, "none", "auto"):
        raise APIError("tool_choice other than 'none' or 'auto' is not supported (octavo does "
                       "not parse tool calls): leave it out", 400, "tool_choice")


class _ChatRun:
    def __init__(self, model: str, request_id: str, req: ChatCompletionRequest,
                 params: SamplingParams, num_prompt_tokens: int, role: str = "assistant"
                 ) -> None:
        self.model, self.id, self.req, self.params = model, request_id, req, params
        self.role = role
        self.num_prompt_tokens = num_prompt_tokens

    def usage(self, out: RequestOutput | None) -> UsageInfo:
        completion = sum(len(c.token_ids) for c in out.outputs) if out is not None else 0
        return UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion,
                         total_tokens=self.num_prompt_tokens + completion)

    def _logprobs(self, token_ids: list[int], entries: SampleLogprobs | None
                  ) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        k = self.req.top_logprobs or 0
        content = []
        for tok, entry in zip(token_ids, entries or []):
            top = sorted(entry.values(), key=lambda e: e.rank or 0)[:k]
            content.append(TokenLogprob(**_token(entry[tok]),
                                        top_logprobs=[TopLogprob(**_token(e)) for e in top]))
        return ChatLogprobs(content=content)

    def response(self, out: RequestOutput) -> ChatResponse:
        choices = [ChatChoice(index=c.index, message=ChatMessage(role=self.role, content=c.text),
                              logprobs=self._logprobs(c.token_ids, c.logprobs),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        return ChatResponse(id=self.id, model=self.model, choices=choices, usage=self.usage(out),
                            prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs))

    def _chunk(self, choice: ChatStreamChoice | None, usage: UsageInfo | None = None) -> str:
        return sse(ChatStreamResponse(id=self.id, model=self.model,
                                      choices=[choice] if choice else [], usage=usage))

    async def stream(self, outputs) -> AsyncIterator[str]:
        for i in range(self.params.n):     # OpenAI's first chunk of a choice names the role
            yield self._chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role=self.role,
                                                                           content="")))
        states = [ChoiceState() for _ in range(self.params.n)]
        last = None
        try:
            async for _, out in outputs:
                last = out
                for c in out.outputs:
                    state = states[c.index]
                    if state.finished:
                        continue
                    new_text, start, end = state.delta(c, self.params)
                    if not new_text and not state.finished:
                        state.num_tokens = start   # send these tokens' logprobs with the text
                        continue
                    yield self._chunk(ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=new_text),
                        logprobs=self._logprobs(c.token_ids[start:end],
                                                (c.logprobs or [])[start:end]),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if self.req.include_usage:
                yield self._chunk(None, self.usage(last))
        except APIError as e:
            yield sse(e.response())
        except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band
            yield sse(APIError(str(e), error_status(e)).response())
        yield SSE_DONE


def _token(lp) -> dict:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": max(lp.logprob, -9999.0), "bytes": list(text.encode())}
