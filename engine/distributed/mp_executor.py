"""MultiprocExecutor: one spawned worker process per rank; the engine's process is the driver.

The driver holds no model shard: it schedules and samples, sends each step (pickled once) to
every worker over a pipe, and reads the logits back from TP rank 0 of the last pipeline stage
(every worker acknowledges each step, so a failure on any rank surfaces at once). A worker that
dies or raises ends the executor: the driver raises an error naming the rank and stops every
worker (terminate, then kill), so no process outlives it; workers also exit when the driver
disappears (they watch their parent pid) and ignore Ctrl-C, which the driver handles.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait

from octavo.config import EngineConfig
from octavo.executor import Executor
from octavo.scheduler import SchedulerOutput

from .step import to_step_output, to_wire
from .worker import RankInfo, Worker, init_distributed

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = float(os.environ.get("OCTAVO_WORKER_STARTUP_TIMEOUT", "600"))


class WorkerError(RuntimeError):
    """A worker process died or raised; the executor is shut down."""


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        _check_model_supports(config)
        self.world_size = config.world_size
        self.info = [RankInfo(r, config.tensor_parallel_size, config.pipeline_parallel_size)
                     for r in range(self.world_size)]
        self.output_rank = self.info[0].output_rank
        self.procs: list = []
        self.conns: list = []
        self.dead: str | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        try:
            self._start(config)
            sizes = self._gather("startup", STARTUP_TIMEOUT_S)
            self.num_blocks = min(blocks for blocks, _ in sizes)
            # state slots: the same on every rank (TP ranks of a state model hold its mixers whole)
            self.num_state_slots = min(slots for _, slots in sizes)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        # the children read these as they import torch (before any code of ours runs there)
        env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for info in self.info:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, name=f"octavo-worker-{info.rank}",
                                args=(config, info, init_method, threads, child, os.getpid()),
                                daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _gather(self, what: str, timeout: float | None = None) -> list:
        """One reply from every worker; raises WorkerError naming the first rank that died or
        failed (and shuts every worker down)."""
        replies: dict[int, object] = {}
        waiting = dict(enumerate(self.conns))
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*waiting.values(), *sentinels], timeout=left)
            if not ready:
                self._fail(f"workers {sorted(waiting)} did not answer {what} within {timeout:.0f}s")
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels[obj]
                    if rank in waiting and waiting[rank].poll():
                        continue                     # its last reply is still to be read
                    p = self.procs[rank]
                    p.join(0)
                    self._fail(f"worker rank {rank} (pid {p.pid}) died during {what} "
                               f"(exit code {p.exitcode})")
                rank = next(r for r, c in waiting.items() if c is obj)
                try:
                    status, payload = obj.recv()
                except (EOFError, OSError):
                    self._fail(f"worker rank {rank} (pid {self.procs[rank].pid}) closed its pipe "
                               f"during {what}")
                if status == "error":
                    self._fail(f"worker rank {rank} failed during {what}:\n{payload}")
                if status == "invalid":      # raised as the in-process engine would raise it
                    self.dead = f"worker rank {rank} refused the configuration: {payload}"
                    self.shutdown()
                    raise ValueError(payload)
                replies[rank] = payload
                del waiting[rank]
        return [replies[r] for r in range(len(self.conns))]

    def _fail(self, message: str) -> None:
        self.dead = message
        self.shutdown()
        raise WorkerError(message)

    def _broadcast(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except (BrokenPipeError, OSError):
                self._fail(f"worker rank {rank} (pid {self.procs[rank].pid}) is gone "
                           f"(exit code {self.procs[rank].exitcode})")

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(f"the workers are shut down: {self.dead}")

    def init_kv_cache(self) -> int:
        """Every rank sized its cache from its own shard; all use the smallest count."""
        self._check_alive()
        self._broadcast(("kv", self.num_blocks))
        self._gather("KV cache allocation")
        return self.num_blocks

    def execute(self, out: SchedulerOutput):
        self._check_alive()
        try:
            self._broadcast(("step", to_wire(out)))
            result = self._gather("a step")[self.output_rank]
        except KeyboardInterrupt:
            # the workers may be inside the step's collectives: they cannot be reused
            self.dead = "interrupted (Ctrl-C) during a step"
            self.shutdown()
            raise
        return to_step_output(out, result)

    def shutdown(self) -> None:
        self._finalizer()


def _shutdown(procs: list, conns: list) -> None:
    for conn in conns:                 # a clean exit for the workers that are idle
        try:
            conn.send_bytes(pickle.dumps(("stop", None)))
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:                    # still in a collective with a dead peer, or stuck
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_model_supports(config: EngineConfig) -> None:
    from octavo.models.layers.pipeline import check_parallel_support
    from octavo.models.registry import get_model_class
    check_parallel_support(get_model_class(config.hf_config), config.hf_config,
                           config.tensor_parallel_size, config.pipeline_parallel_size)


def _watch_parent(parent_pid: int) -> None:
    # a driver killed with SIGKILL cannot stop its workers: they notice and exit on their own
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(config: EngineConfig, info: RankInfo, init_method: str, threads: int,
                 conn, parent_pid: int) -> None:
    import torch
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the driver's to handle
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        init_distributed(info, config.device, init_method)
        worker = Worker(config, info)
        conn.send(("ok", worker.init_kv_cache()))
    except ValueError as e:  # a setting this model's shard cannot take: the user's to change
        conn.send(("invalid", str(e)))
        return
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if kind == "stop":
            break
        try:
            if kind == "kv":
                worker.resize_kv_cache(payload)
                conn.send(("ok", None))
            elif kind == "step":
                conn.send(("ok", worker.execute_wire(payload)))
        except BaseException:  # noqa: BLE001 - reported to the driver, which raises it
            conn.send(("error", traceback.format_exc()))
            break
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
