"""RayExecutor (`distributed_executor_backend="ray"`): one Ray actor per rank, for clusters that
already run Ray (`RAY_ADDRESS`, or `ray.init` done by the caller); without one, a local Ray
instance is started and stopped with the engine. The actors join torch.distributed (gloo on CPU,
NCCL on GPUs) at rank 0's node and run the same Worker as the multiprocess executor: each step
goes to every actor once (one object in Ray's store), the logits come back from the last stage."""
from __future__ import annotations

import os
import socket

from octavo.config import EngineConfig
from octavo.executor import Executor
from octavo.scheduler import SchedulerOutput

from .mp_executor import WorkerError, _check_model_supports
from .step import to_step_output, to_wire
from .worker import RankInfo, Worker, init_distributed

STEP_TIMEOUT_S = None            # a step has no deadline; a dead actor raises RayActorError


class _RankActor:
    """One rank's model shard inside a Ray actor process."""

    def __init__(self, threads: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        torch.set_num_threads(threads)
        self.worker = None

    def address(self) -> tuple[str, int]:
        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def start(self, config: EngineConfig, info: RankInfo, init_method: str) -> tuple[int, int]:
        init_distributed(info, config.device, init_method)
        self.worker = Worker(config, info)
        return self.worker.init_kv_cache()

    def resize(self, num_blocks: int) -> None:
        self.worker.resize_kv_cache(num_blocks)

    def step(self, wire):
        return self.worker.execute_wire(wire)

    def stop(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        import ray

        _check_model_supports(config)
        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            # RAY_ADDRESS names an existing cluster; without it Ray starts a local instance
            ray.init(include_dashboard=False, log_to_driver=False,
                     **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
            self.started_ray = True
        world = config.world_size
        self.info = [RankInfo(r, config.tensor_parallel_size, config.pipeline_parallel_size)
                     for r in range(world)]
        self.output_rank = self.info[0].output_rank
        gpu = config.device == "cuda"
        threads = 1 if gpu else max(1, (os.cpu_count() or 1) // world)
        actor = ray.remote(_RankActor).options(num_cpus=0 if gpu else threads,
                                               num_gpus=1 if gpu else 0)
        self.actors = [actor.remote(threads) for _ in range(world)]
        try:
            ip, port = ray.get(self.actors[0].address.remote())
            counts = self._get([a.start.remote(config, info, f"tcp://{ip}:{port}")
                                for a, info in zip(self.actors, self.info)], "startup")
            self.num_blocks = min(blocks for blocks, _ in counts)
            self.num_state_slots = min(slots for _, slots in counts)
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs: list, what: str) -> list:
        try:
            return self.ray.get(refs, timeout=STEP_TIMEOUT_S)
        except self.ray.exceptions.RayError as e:
            failed = next((r for r, ref in enumerate(refs) if _failed(self.ray, ref)), None)
            rank = f"rank {failed}" if failed is not None else "a rank"
            raise WorkerError(f"{rank} failed during {what}: {e}") from e

    def init_kv_cache(self) -> int:
        """Every rank sized its cache from its own shard; all use the smallest count."""
        self._get([a.resize.remote(self.num_blocks) for a in self.actors], "KV cache allocation")
        return self.num_blocks

    def execute(self, out: SchedulerOutput):
        wire = self.ray.put(to_wire(out))
        results = self._get([a.step.remote(wire) for a in self.actors], "a step")
        return to_step_output(out, results[self.output_rank])

    def shutdown(self) -> None:
        actors, self.actors = getattr(self, "actors", []), []
        for a in actors:
            try:
                self.ray.get(a.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
            self.ray.kill(a)
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_ray = False


def _failed(ray, ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ready[0], timeout=0)
        return False
    except ray.exceptions.RayError:
        return True
