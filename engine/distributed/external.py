"""ExternalLauncherExecutor: torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) starts every rank; each runs the same script, engine and scheduler, holds its
model shard in-process, and receives the last stage's logits by broadcast, so every rank samples
the same tokens (greedy, or seeded sampling) and the schedulers stay in step, as in vLLM.

`octavo serve` under torchrun cannot work that way (requests reach rank 0's HTTP port only), so
there rank 0 drives (TorchrunDriverExecutor: it serves, schedules and sends each step to the
other ranks) and every other rank follows (follow_driver: it runs its shard of each step it is
sent), as the multiprocess executor's workers do, over torch.distributed instead of pipes."""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from octavo.config import EngineConfig
from octavo.executor import Executor
from octavo.scheduler import SchedulerOutput

from .mp_executor import _check_model_supports
from .step import from_wire, result_of, to_step_output, to_wire
from .worker import RankInfo, Worker, init_distributed


# `octavo serve` sets this on every rank it runs under torchrun: rank 0 then drives
DRIVER_ENV = "OCTAVO_TORCHRUN_DRIVER"


def under_torchrun() -> bool:
    """Started by torchrun (or a launcher like it) with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class ExternalLauncherExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ValueError(f"distributed_executor_backend='external_launcher' expects torchrun "
                             f"to set {missing}: start the script with torchrun --nproc-per-node "
                             f"{config.world_size} (or use 'mp')")
        world = int(os.environ["WORLD_SIZE"])
        if world != config.world_size:
            raise ValueError(f"torchrun started {world} ranks, but tensor_parallel_size="
                             f"{config.tensor_parallel_size} x pipeline_parallel_size="
                             f"{config.pipeline_parallel_size} = {config.world_size}: make them "
                             "equal")
        _check_model_supports(config)
        self.info = RankInfo(int(os.environ["RANK"]), config.tensor_parallel_size,
                             config.pipeline_parallel_size)
        if not dist.is_initialized():
            init_distributed(self.info, config.device, "env://")
        self.worker = Worker(config, self.info)
        self.device = torch.device(config.device)

    def init_kv_cache(self) -> int:
        n = torch.tensor(self.worker.init_kv_cache(), device=self.device)  # [blocks, slots]
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        blocks, self.num_state_slots = (int(v) for v in n.tolist())
        self.worker.resize_kv_cache(blocks)
        return blocks

    def execute(self, out: SchedulerOutput):
        result = self.worker.execute(out)
        box = [result_of(out, result) if self.info.returns_output else None]
        dist.broadcast_object_list(box, src=self.info.output_rank)
        return to_step_output(out, box[0])

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _control_group():
    """The group rank 0's step messages travel on. An idle server leaves the followers waiting
    for the next step for as long as it idles: no 30-minute gloo timeout on this group."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


class TorchrunDriverExecutor(ExternalLauncherExecutor):
    """Rank 0 of `octavo serve` under torchrun: schedules, sends each step to the followers,
    runs its own shard, and gets the logits from the last stage's first rank."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if self.info.rank != 0:
            raise ValueError("only rank 0 drives; the other ranks run follow_driver()")
        self.control = _control_group()
        self.stopped = False
        atexit.register(self.shutdown)          # the followers leave their loop with the server

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)

    def execute(self, out: SchedulerOutput):
        self._send(("step", to_wire(out)))
        return super().execute(out)

    def shutdown(self) -> None:
        if not self.stopped and dist.is_initialized():
            self.stopped = True
            try:
                self._send(("stop", None))
            finally:
                super().shutdown()


def follow_driver(config: EngineConfig) -> None:
    """The loop of ranks 1.. of `octavo serve` under torchrun: join, size the KV cache with the
    others, then run every step rank 0 sends until it says stop."""
    from octavo.llm_engine import _load_hf_config

    config.resolve(_load_hf_config(config))       # as LLMEngine does before its executor
    executor = ExternalLauncherExecutor(config)
    control = _control_group()
    executor.init_kv_cache()
    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            kind, payload = box[0]
            if kind == "stop":
                break
            executor.execute(from_wire(payload))
    finally:
        executor.shutdown()
