"""ExternalLauncherExecutor: torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) starts every rank; each runs the same script, engine and scheduler, holds its
model shard in-process, and receives the last stage's logits by broadcast, so every rank samples
the same tokens (greedy, or seeded sampling) and the schedulers stay in step, as in vLLM."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from octavo.config import EngineConfig
from octavo.executor import Executor
from octavo.scheduler import SchedulerOutput

from .mp_executor import _check_model_supports
from .step import result_of, to_step_output
from .worker import RankInfo, Worker, init_distributed


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
        n = torch.tensor([self.worker.init_kv_cache()], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        self.worker.resize_kv_cache(int(n.item()))
        return int(n.item())

    def execute(self, out: SchedulerOutput):
        result = self.worker.execute(out)
        box = [result_of(out, result) if self.info.returns_output else None]
        dist.broadcast_object_list(box, src=self.info.output_rank)
        return to_step_output(out, box[0])

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
