"""AsyncLLMEngine: one engine thread steps the (not thread-safe) LLMEngine while asyncio code adds
and aborts requests; each request gets its own asyncio queue of RequestOutputs.

Every add / abort / step happens on the engine thread: callers only put commands on a queue and
wait. A request that fails validation gets its ValueError back and changes nothing; a step that
raises fails the requests in flight and the loop goes on serving new ones.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from .llm_engine import LLMEngine, PromptType
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps between checks for a shutdown.
_IDLE_WAIT_S = 0.5


class StatsObserver(Protocol):
    """What the engine thread reports (the server's Prometheus metrics implement it)."""

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float) -> None: ...
    def on_prompt_tokens(self, n: int) -> None: ...
    def on_new_tokens(self, n: int, first: bool, seconds: float) -> None: ...
    def on_finished(self, finish_reason: str) -> None: ...


@dataclass
class _Stream:
    """One request as the engine thread tracks it, and the queue its consumer reads."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    num_tokens: int = 0

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                # the consumer's event loop is closed: nobody listens
            pass


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, observer: StatsObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="octavo-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_Stop())
        self._thread.join(timeout)

    # ---- asyncio side ---------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType,
                          params: SamplingParams) -> asyncio.Queue:
        """Queue a request; raises the engine's ValueError if it is invalid. The returned queue
        yields RequestOutputs (the last has finished=True) or an Exception."""
        if not self.is_running:
            raise RuntimeError("the engine thread has stopped")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        self._commands.put(_Add(request_id, prompt, params, stream))
        try:
            await stream.added
        except asyncio.CancelledError:
            self.abort(request_id)          # it may have been added before we were cancelled
            raise
        return stream.queue

    async def generate(self, request_id: str, prompt: PromptType,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs (see stream_outputs)."""
        q = await self.add_request(request_id, prompt, params)
        async for out in self.stream_outputs(request_id, q):
            yield out

    async def stream_outputs(self, request_id: str, q: asyncio.Queue
                             ) -> AsyncIterator[RequestOutput]:
        """Yield an added request's outputs as they come; leaving early (a disconnected client,
        a cancelled task) aborts the request and frees its KV blocks."""
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished_requests()
            if not self._drain_commands(block):
                break
            if self.engine.has_unfinished_requests():
                self._step()
        for rid in list(self._streams):
            self._fail(rid, RuntimeError("the engine was shut down"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle). False means shut down."""
        while True:
            try:
                cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else \
                    self._commands.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if isinstance(cmd, _Stop):
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort(cmd.request_id)
            self._report_step()

    def _add(self, cmd: _Add) -> None:
        stream = cmd.stream
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except Exception as e:  # noqa: BLE001 - any failure belongs to this request alone
            stream.loop.call_soon_threadsafe(_set_exception, stream.added, e)
            return
        self._streams[cmd.request_id] = stream
        stream.loop.call_soon_threadsafe(_set_result, stream.added)
        if self.observer is not None:
            self.observer.on_prompt_tokens(len(self.engine.parents[cmd.request_id]
                                               .children[0].prompt_token_ids))

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return                       # already finished
        self.engine.abort_request(request_id)
        if self.observer is not None:
            self.observer.on_finished("abort")

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id)
        self.engine.abort_request(request_id)
        stream.put(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - keep serving; the requests in flight fail
            logger.exception("engine step failed; failing %d requests", len(self._streams))
            for rid in list(self._streams):
                self._fail(rid, RuntimeError(f"the engine failed while generating: {e}"))
            return
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._record_tokens(stream, out, now)
            if out.finished:
                del self._streams[out.request_id]
                if self.observer is not None:
                    for c in out.outputs:
                        self.observer.on_finished(c.finish_reason or "abort")
            stream.put(out)
        self._report_step()

    def _record_tokens(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - stream.num_tokens
        if new <= 0 or self.observer is None:
            return
        first = stream.last_token_time is None
        since = stream.arrival if first else stream.last_token_time
        self.observer.on_new_tokens(new, first, now - since)
        stream.num_tokens = total
        stream.last_token_time = now

    def _report_step(self) -> None:
        if self.observer is None:
            return
        sched = self.engine.scheduler
        self.observer.on_step(len(sched.running), len(sched.waiting), self.engine.kv.usage)


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
