"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLMEngine, run by uvicorn.

`python -m octavo.entrypoints.openai.api_server MODEL [options]` or `octavo serve MODEL`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import secrets
import sys
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from octavo.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from octavo.chat_utils import load_chat_template
from octavo.llm_engine import LLMEngine

from octavo.arg_utils import EngineArgs

from .cli_args import make_arg_parser
from .guards import BodyGuard, InternalErrorGuard
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                       ModelList, TokenizeRequest)
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_engine import APIError, ServerContext, error_response
from .serving_lora import LoadLoRAAdapterRequest, OpenAIServingLoRA, UnloadLoRAAdapterRequest
from .serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)

# After the engine dies, /health answers 503 for this long before the server exits (status 1),
# so that a health checker sees why.
_DEAD_GRACE_S = 2.0


def build_context(args: argparse.Namespace) -> tuple[ServerContext, ServerMetrics]:
    """Load the model and start the engine thread."""
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    chat_template = load_chat_template(args.chat_template)     # a bad path fails before loading
    # the model as given; with none, the default model's name (model_source), not its path
    model = engine_args.model or getattr(config, "model_name", None) or config.model
    names = args.served_model_name or [model]
    metrics = ServerMetrics(names[0])
    llm_engine = LLMEngine(config)
    loras = OpenAIServingLoRA.load_startup_modules(llm_engine, getattr(args, "lora_modules", None),
                                                   names)
    # A copy for the event loop: the engine thread's tokenizer is not shared across threads.
    tokenizer = copy.deepcopy(llm_engine.tokenizer)
    engine = AsyncLLMEngine(llm_engine, observer=metrics)
    ctx = ServerContext(engine=engine, served_model_names=names, model_path=model,
                        tokenizer=tokenizer, chat_template=chat_template,
                        response_role=getattr(args, "response_role", "assistant"),
                        trust_request_chat_template=getattr(
                            args, "trust_request_chat_template", False),
                        lora_requests=loras)
    return ctx, metrics


def build_app(args: argparse.Namespace, ctx: ServerContext, metrics: ServerMetrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        ctx.engine.shutdown()

    app = FastAPI(lifespan=lifespan)
    _add_error_handlers(app)
    app.add_middleware(BodyGuard)
    if args.api_key:
        _add_api_key_check(app, args.api_key)
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins,
                       allow_credentials=args.allow_credentials,
                       allow_methods=args.allowed_methods, allow_headers=args.allowed_headers)
    app.add_middleware(InternalErrorGuard)                     # outermost
    completion, chat = OpenAIServingCompletion(ctx), OpenAIServingChat(ctx)
    tokenization = OpenAIServingTokenization(ctx, chat)
    lora = OpenAIServingLoRA(ctx)
    app.state.ctx = ctx

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves; 503 once it is dead (see AsyncLLMEngine: failures
        inside a step that it recovers from fail their requests, not /health)."""
        engine = ctx.engine
        if not engine.is_running:
            cause = engine.dead if engine.dead is not None else "shut down"
            return JSONResponse(error_response(f"the engine is not running: {cause}", 503)
                                .model_dump(), status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=ctx.model_path,
                                         max_model_len=ctx.max_model_len)
                               for name in ctx.served_model_names] + lora.model_cards())

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        return await lora.load(req)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        return await lora.unload(req)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        return tokenization.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return tokenization.detokenize(req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return _reply(await _cancel_on_disconnect(completion.create(req), raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return _reply(await _cancel_on_disconnect(chat.create(req), raw))

    return app


async def _cancel_on_disconnect(coro, raw: Request):
    """Run a handler; if the client goes away first, cancel it, which aborts its requests
    (Starlette does not cancel a non-streaming handler by itself; streams watch on their own)."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return None
    return task.result()


def _reply(result):
    if result is None:                        # the client left: nobody reads the reply
        return Response(status_code=499)
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump())


def _add_error_handlers(app: FastAPI) -> None:
    def reply(message: str, status: int, param: str | None = None) -> JSONResponse:
        return JSONResponse(error_response(message, status, param).model_dump(),
                            status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return reply(e.message, e.status, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return reply(f"the request body is not valid JSON: {detail}".rstrip(": "), 400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        return reply(f"invalid request body: {where + ': ' if where else ''}"
                     f"{first.get('msg', 'malformed')}", 400, where or None)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, e: ValueError) -> JSONResponse:
        return reply(str(e), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 ("error parsing the body"), unknown routes, wrong methods.
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            message = f"{message}: no such endpoint"
        return JSONResponse(error_response(message, e.status_code).model_dump(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, e: RequestFailedError) -> JSONResponse:
        return reply(str(e), 500)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return reply(str(e), 503)


def _add_api_key_check(app: FastAPI, api_key: str) -> None:
    # Plain ASGI rather than @app.middleware: BaseHTTPMiddleware buffers streaming responses'
    # disconnects, and a client that leaves must abort its request at once.
    app.add_middleware(_APIKeyMiddleware, expected=f"Bearer {api_key}".encode())


class _APIKeyMiddleware:
    def __init__(self, app, expected: bytes) -> None:
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS"
                or not scope["path"].startswith("/v1")):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        response = JSONResponse(error_response(
            "Unauthorized: give the server's API key as 'Authorization: Bearer KEY'",
            401).model_dump(), status_code=401)
        await response(scope, receive, send)


def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    ctx, metrics = build_context(args)
    app = build_app(args, ctx, metrics)
    logger.info("serving %s on http://%s:%d", ctx.served_model_names, args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.uvicorn_log_level,
                                           root_path=args.root_path or ""))
    ctx.engine.on_dead = lambda _: threading.Timer(
        _DEAD_GRACE_S, setattr, (server, "should_exit", True)).start()
    server.run()
    if ctx.engine.dead is not None:
        logger.error("exiting: the engine died (%s)", ctx.engine.dead)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    run_server(make_arg_parser().parse_args(argv))


if __name__ == "__main__":
    main()
