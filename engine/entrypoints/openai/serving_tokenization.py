"""/tokenize and /detokenize with vLLM's request and response shapes."""
from __future__ import annotations

from .protocol import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse,
                       TokenizeRequest, TokenizeResponse)
from .serving_chat import OpenAIServingChat
from .serving_engine import APIError, ServerContext


class OpenAIServingTokenization:
    def __init__(self, ctx: ServerContext, chat: OpenAIServingChat) -> None:
        self.ctx, self.chat = ctx, chat

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        ctx = self.ctx
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt or messages", 400, "prompt")
        if req.messages is not None:
            chat_req = ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, tools=req.tools,
                chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs,
                add_special_tokens=bool(req.add_special_tokens))
            ids = self.chat.render(chat_req)["prompt_token_ids"]
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=add)
        strs = ctx.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                                token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        ctx = self.ctx
        ctx.check_model(req.model)
        vocab = len(ctx.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids {bad[:5]} are outside the tokenizer's vocabulary "
                           f"[0, {vocab})", 400, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))
