"""Executors: what runs a scheduled step's forward. The engine schedules and samples; an executor
turns a SchedulerOutput into logits, in this process (UniProcExecutor) or on worker processes
that share the model over torch.distributed (octavo.distributed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineConfig
from .scheduler import SchedulerOutput

if TYPE_CHECKING:
    from .model_runner import StepOutput


class Executor:
    """init_kv_cache() -> number of KV blocks (the same on every rank); execute(step) ->
    StepOutput; shutdown() frees workers (idempotent)."""

    def init_kv_cache(self) -> int:
        raise NotImplementedError

    def execute(self, out: SchedulerOutput) -> "StepOutput":
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    """Today's path: one ModelRunner in the engine's own process."""

    def __init__(self, config: EngineConfig) -> None:
        from .model_runner import ModelRunner
        self.runner = ModelRunner(config)

    def init_kv_cache(self) -> int:
        return self.runner.init_kv_cache()

    def execute(self, out: SchedulerOutput) -> "StepOutput":
        return self.runner.execute(out)


def make_executor(config: EngineConfig) -> Executor:
    """The executor config.distributed_executor_backend names ("uni" for one process)."""
    backend = config.distributed_executor_backend
    if backend == "uni":
        return UniProcExecutor(config)
    if backend == "mp":
        from .distributed.mp_executor import MultiprocExecutor
        return MultiprocExecutor(config)
    if backend == "external_launcher":
        import os

        from .distributed.external import (DRIVER_ENV, ExternalLauncherExecutor,
                                           TorchrunDriverExecutor)
        if os.environ.get(DRIVER_ENV) == "1":
            return TorchrunDriverExecutor(config)
        return ExternalLauncherExecutor(config)
    if backend == "ray":
        from .distributed.ray_executor import RayExecutor
        return RayExecutor(config)
    raise ValueError(f"unknown distributed_executor_backend {backend!r}")
