"""AsyncLLMEngine: one engine thread steps the (not thread-safe) LLMEngine while asyncio code adds
and aborts requests; each request gets its own asyncio queue of RequestOutputs.

Every add / abort / step happens on the engine thread: callers only put commands on a queue and
wait. A request that fails validation gets its ValueError back and changes nothing.

Failures inside a step (the policy the server documents): the engine recovers from them. A
failure pinned on one request (its sampling, logprobs, detokenization) fails that request alone;
a failing forward fails the requests of that step; an unexpected error outside those fails every
request in flight. Each failed request's consumer gets a RequestFailedError (HTTP 500) and the
loop goes on serving. The engine dies instead, when an error is fatal (marked `fatal = True`,
a MemoryError, a CUDA error: a broken device) or after _MAX_FAILED_STEPS failing steps in a
row: then every
request gets an EngineDeadError (HTTP 503), `dead` holds the cause, `on_dead` is called (the
server answers /health with 503 and exits with status 1) and new requests are refused.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from .llm_engine import LLMEngine, PromptType, StepError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps between checks for a shutdown.
_IDLE_WAIT_S = 0.5
# Failing steps in a row after which the engine is taken for broken.
_MAX_FAILED_STEPS = 3


class RequestFailedError(RuntimeError):
    """This request failed inside an engine step; the engine goes on serving."""


class EngineDeadError(RuntimeError):
    """The engine has stopped (a fatal error, or shut down): no request can be served."""


class _Died(Exception):
    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


def _is_fatal(e: BaseException) -> bool:
    return bool(getattr(e, "fatal", False)) or isinstance(e, MemoryError) \
        or "CUDA error" in str(e)


class StatsObserver(Protocol):
    """What the engine thread reports (the server's Prometheus metrics implement it)."""

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float) -> None: ...
    def on_prompt_tokens(self, n: int) -> None: ...
    def on_new_tokens(self, n: int, first: bool, seconds: float) -> None: ...
    def on_finished(self, finish_reason: str) -> None: ...
    def on_cache(self, num_free_blocks: int, num_blocks: int, num_preemptions: int) -> None: ...
    def on_failed_step(self) -> None: ...
    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int,
                       num_accepted_tokens: int) -> None: ...


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
    lora_request: Any = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run fn(engine) on the engine thread (adapter loads touch what steps use)."""
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class _Stop:
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, observer: StatsObserver | None = None,
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.on_dead = on_dead
        self.dead: BaseException | None = None        # why the engine died, if it did
        self.num_failed_steps = 0
        self._failed_in_a_row = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Held while checking that the thread is still accepting and queueing a command, and
        # while the stopping thread turns it off, so that no command is queued to a dead loop.
        self._accepting_lock = threading.Lock()
        self._accepting = True
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="octavo-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_Stop())
        self._thread.join(timeout)

    # ---- asyncio side ---------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) run on the engine thread between steps; its result or exception."""
        loop = asyncio.get_running_loop()
        cmd = _Call(fn, loop, loop.create_future())
        with self._accepting_lock:
            if not self._accepting:
                raise self._dead_error()
            self._commands.put(cmd)
        return await cmd.done

    async def add_request(self, request_id: str, prompt: PromptType,
                          params: SamplingParams, lora_request: Any = None) -> asyncio.Queue:
        """Queue a request; raises the engine's ValueError if it is invalid. The returned queue
        yields RequestOutputs (the last has finished=True) or an Exception."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        with self._accepting_lock:
            if not self._accepting:
                raise self._dead_error()
            self._commands.put(_Add(request_id, prompt, params, stream, lora_request))
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
    def _dead_error(self) -> EngineDeadError:
        if self.dead is None:
            return EngineDeadError("the engine was shut down")
        return EngineDeadError(f"the engine has stopped after a fatal error: "
                               f"{type(self.dead).__name__}: {self.dead}")

    def _run(self) -> None:
        try:
            self._report_step()                      # the cache gauges, before any request
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except _Died as d:
            self.dead = d.cause
        except BaseException as e:  # noqa: BLE001 - a bug in the loop itself: nothing is safe
            logger.exception("the engine loop failed")
            self.dead = e
        if self.dead is not None:
            logger.error("the engine is dead: %s: %s", type(self.dead).__name__, self.dead)
        with self._accepting_lock:
            self._accepting = False
        error = self._dead_error()
        for rid in list(self._streams):
            self._fail(rid, error)
        while True:                                  # adds queued before accepting stopped
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                cmd.stream.loop.call_soon_threadsafe(_set_exception, cmd.stream.added, error)
            elif isinstance(cmd, _Call):
                cmd.loop.call_soon_threadsafe(_set_exception, cmd.done, error)
        if self.dead is not None and self.on_dead is not None:
            self.on_dead(self.dead)

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
            elif isinstance(cmd, _Call):
                self._call(cmd)
            else:
                self._abort(cmd.request_id)
            self._report_step()

    def _add(self, cmd: _Add) -> None:
        stream = cmd.stream
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                                    lora_request=cmd.lora_request)
        except Exception as e:  # noqa: BLE001 - any failure belongs to this request alone
            stream.loop.call_soon_threadsafe(_set_exception, stream.added, e)
            return
        self._streams[cmd.request_id] = stream
        stream.loop.call_soon_threadsafe(_set_result, stream.added)
        if self.observer is not None:
            self.observer.on_prompt_tokens(len(self.engine.parents[cmd.request_id]
                                               .children[0].prompt_token_ids))

    def _call(self, cmd: _Call) -> None:
        try:
            result = cmd.fn(self.engine)
        except Exception as e:  # noqa: BLE001 - the caller's error
            cmd.loop.call_soon_threadsafe(_set_exception, cmd.done, e)
            return
        cmd.loop.call_soon_threadsafe(_set_call_result, cmd.done, result)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return                       # already finished
        self.engine.abort_request(request_id)
        if self.observer is not None:
            self.observer.on_finished("abort")

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - a broken engine must not keep the error from its
            logger.exception("could not abort request %s", request_id)   # consumer
        if stream is not None:
            stream.put(error)
            if self.observer is not None:
                self.observer.on_finished("error")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:
            if e.whole_step:
                self._failed_step(e.cause)        # if this kills the engine, every stream
            else:                                 # gets the EngineDeadError instead
                self._failed_in_a_row = 0
            for rid, error in e.failed.items():
                self._fail(rid, RequestFailedError(
                    f"the engine failed while generating: {type(error).__name__}: {error}"))
            outputs = e.outputs
        except Exception as e:  # noqa: BLE001 - keep serving; the requests in flight fail
            logger.exception("engine step failed; failing %d requests", len(self._streams))
            self._failed_step(e)
            for rid in list(self._streams):
                self._fail(rid, RequestFailedError(f"the engine failed while generating: {e}"))
            outputs = []
        else:
            self._failed_in_a_row = 0
        self._deliver(outputs)
        self._report_step()

    def _failed_step(self, error: BaseException) -> None:
        self.num_failed_steps += 1
        self._failed_in_a_row += 1
        if self.observer is not None:
            self.observer.on_failed_step()
        if _is_fatal(error) or self._failed_in_a_row >= _MAX_FAILED_STEPS:
            raise _Died(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
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
        sched, kv = self.engine.scheduler, self.engine.kv
        self.observer.on_step(len(sched.running), len(sched.waiting), kv.usage)
        self.observer.on_cache(kv.pool.num_free, kv.num_blocks, sched.num_preemptions)
        if self.engine.spec is not None:
            st = self.engine.spec.stats
            self.observer.on_spec_decode(st.num_drafts, st.num_draft_tokens,
                                         st.num_accepted_tokens)


def _set_call_result(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
