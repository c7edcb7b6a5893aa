"""ASGI guards that keep hostile or broken requests from reaching the endpoints: a body check
(encoding, media type, size, strict JSON) and a last-resort handler for unexpected errors, both
answering in OpenAI's error shape."""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi.responses import JSONResponse

from .serving_engine import error_response

logger = logging.getLogger(__name__)

# Far above any prompt a context window can hold; bounds the memory one request can take.
MAX_BODY_BYTES = 32 << 20
# JSON nested deeper than this is refused (no endpoint needs more than a few levels, and very
# deep values overflow recursive code downstream: pydantic, Jinja, the tokenizer).
MAX_JSON_DEPTH = 64
_INT64 = (-(1 << 63), (1 << 63) - 1)


class BodyError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _reply(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_response(message, status).model_dump(), status_code=status,
                        headers=headers)


class BodyGuard:
    """Reads a POST body once, refuses what the endpoints cannot take (compressed or non-JSON
    bodies, over-size bodies, invalid UTF-8, NaN/Infinity, numbers beyond 64 bits, lone
    surrogates, deep nesting) with a 4xx, and replays the body to the app otherwise."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            check_headers(headers)
            body = await self._read(receive)
            if body:
                check_json(body)
        except BodyError as e:
            return await _reply(str(e), e.status)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()          # later calls wait for the client's disconnect

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BodyError("the client disconnected while sending the body")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyError(f"the request body is larger than {self.max_body_bytes} bytes",
                                413)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


def check_headers(headers: dict[str, str]) -> None:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BodyError(f"Content-Encoding {encoding!r} is not supported: send the JSON body "
                        "uncompressed", 415)
    ctype = headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/")
                                                and media.endswith("+json")):
            raise BodyError(f"Content-Type {media or ctype!r} is not supported: send a JSON "
                            "body with 'Content-Type: application/json'", 415)


def _no_constant(name: str) -> Any:
    raise BodyError(f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the request body is not valid JSON: the number {text[:40]} is out of "
                        "the range of a double")
    return value


def check_json(body: bytes) -> None:
    """Raise BodyError unless `body` is strict JSON that the endpoints can take."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the request body is not valid UTF-8 (byte {e.start}): send "
                        "UTF-8-encoded JSON") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except BodyError:
        raise
    except json.JSONDecodeError as e:
        raise BodyError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError(f"the request body is nested more than {MAX_JSON_DEPTH} levels "
                        "deep") from None
    except ValueError as e:                     # an integer of more than 4300 digits
        raise BodyError(f"the request body holds a number too large to use: {e}") from None
    _check_value(value, "", 0)


def _check_value(value: Any, path: str, depth: int) -> None:
    """Walk the parsed body without recursion limits of its own (depth is bounded)."""
    if depth > MAX_JSON_DEPTH:
        raise BodyError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep "
                        f"(at {path or 'the top'})")
    if isinstance(value, str):
        _check_str(value, path)
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise BodyError(f"the integer at {path or 'the top'} is outside the signed 64-bit "
                            "range")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_str(k, path + ".<key>")
            _check_value(v, f"{path}.{k}" if path else k, depth + 1)


def _check_str(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BodyError(f"the string at {path or 'the top'} holds a lone UTF-16 surrogate "
                        f"(\\u{ord(s[e.start]):04x}): JSON strings must be valid Unicode") \
            from None


class InternalErrorGuard:
    """The outermost guard: an exception no handler took becomes a 500 in OpenAI's shape on a
    connection that stays usable (uncaught, uvicorn resets the keep-alive connection). Once a
    reply has started nothing can be said in-band, so the error propagates and the connection
    closes."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await _reply(f"internal server error: {type(e).__name__}: {e}"[:2000],
                         500)(scope, receive, send)
