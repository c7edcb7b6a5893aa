"""One rank: joins torch.distributed, builds its shard of the model (its TP slice of the layers of
its PP stage) in a ModelRunner, and runs each step's forward, pipelined over micro-batches.

Rank layout: rank = pp_rank * tp_size + tp_rank, so a pipeline stage is tp_size consecutive
ranks (one TP group) and rank r of stage s sends its hidden states to rank r of stage s + 1.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from octavo.config import EngineConfig
from octavo.models.layers.parallel_state import set_pipeline_parallel, set_tensor_parallel
from octavo.scheduler import SchedulerOutput

from .step import from_wire, result_of


@dataclass(frozen=True)
class RankInfo:
    rank: int
    tp_size: int
    pp_size: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def returns_output(self) -> bool:
        """The rank whose logits the engine samples from: TP rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def output_rank(self) -> int:
        return (self.pp_size - 1) * self.tp_size


def init_distributed(info: RankInfo, device: str, init_method: str) -> None:
    """Join the world (gloo on CPU, NCCL on CUDA) and make the TP groups; every rank creates
    every group, in the same order, as torch.distributed requires."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", info.rank)) % torch.cuda.device_count())
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method,
                            rank=info.rank, world_size=info.world_size)
    group = None
    for stage in range(info.pp_size):
        ranks = list(range(stage * info.tp_size, (stage + 1) * info.tp_size))
        g = dist.new_group(ranks) if info.tp_size > 1 else None
        if stage == info.pp_rank:
            group = g
    set_tensor_parallel(info.tp_rank, info.tp_size, group)
    set_pipeline_parallel(info.pp_rank, info.pp_size)


class Worker:
    """The model shard of one rank. execute(step) runs the forward on every rank; the last
    stage's ranks return the StepOutput (logits), the others None."""

    def __init__(self, config: EngineConfig, info: RankInfo) -> None:
        from octavo.model_runner import ModelRunner
        self.info = info
        if info.pp_size > 1:
            config.enforce_eager = True   # the pipelined forward replaces the decode buckets
            # the loader would list the other stages' layers as "checkpoint tensors the model
            # does not use" on every rank; a pp=1 run still reports truly unused tensors
            with _quiet_loader():
                self.runner = ModelRunner(config)
        else:
            self.runner = ModelRunner(config)
        self.hidden_size = config.hf_config.hidden_size
        # what a stage passes on: (hidden, residual), or the hidden state alone (Bloom, OPT)
        self.num_intermediate = getattr(self.runner.model, "pp_intermediate_tensors", 2)

    def init_kv_cache(self) -> tuple[int, int]:
        """(KV blocks, state slots) this rank's budget holds (slots: 0 without Mamba layers)."""
        return self.runner.init_kv_cache(), self.runner.num_state_slots

    def resize_kv_cache(self, num_blocks: int) -> None:
        """Use num_blocks (the minimum over the ranks) when this rank's own budget held more."""
        runner = self.runner
        if num_blocks != runner.num_blocks:
            runner._allocate(num_blocks)
            runner.num_blocks = num_blocks
            if runner.decode_graphs is not None and runner.device.type == "cuda":
                runner.decode_graphs.capture()      # the graphs read the cache's addresses

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        if self.info.pp_size == 1:
            return self.runner.execute(out)
        return self._execute_pipelined(out)

    def execute_wire(self, wire):
        """A step received as to_wire's plain data: this rank's WorkerResult when it returns
        the output (the last stage's first rank), else None."""
        out = from_wire(wire)
        result = self.execute(out)
        return result_of(out, result) if self.info.returns_output else None

    def _execute_pipelined(self, out: SchedulerOutput):
        """GPipe-style micro-batches inside a step: the step's requests are cut into up to
        pp_size micro-batches; a stage sends micro-batch k on (isend) and starts k + 1 while
        the next stage works on k, so with M micro-batches a step takes (M + pp - 1) stage-times
        of a micro-batch instead of pp full-batch ones (pp = 2, M = 2: 1.5 instead of 2). M =
        pp_size is the fewest that fills the pipeline; more would shrink the per-micro-batch
        matmuls, which on CPUs costs more than the bubble saves."""
        from octavo.model_runner import StepOutput
        info, runner, model = self.info, self.runner, self.runner.model
        prev = info.rank - info.tp_size
        nxt = info.rank + info.tp_size
        pending, sample_reqs, logits, prompt_logits = [], [], [], []
        runner.prepare_states(out)    # once per step: the micro-batches carry no copies
        for mb in _micro_batches(out, info.pp_size):
            inputs = runner.prepare(mb)
            intermediate = None
            if info.pp_rank > 0:
                buf = torch.empty(self.num_intermediate, len(inputs.input_ids), self.hidden_size,
                                  dtype=runner.dtype, device=runner.device)
                dist.recv(buf, src=prev)
                intermediate = tuple(buf)
            hidden = model(inputs.input_ids, inputs.positions, inputs.attn, intermediate)
            if not info.is_last_stage:
                packed = torch.stack(hidden)             # [n, T, H]: e.g. hidden and residual
                pending.append((dist.isend(packed, dst=nxt), packed))
                continue
            if inputs.sample_requests:
                sample_reqs += inputs.sample_requests
                logits.append(model.compute_logits(hidden[inputs.sample_rows]).float())
            for req, row, rows, first in inputs.prompt_rows:
                targets = req.prompt_token_ids[first:first + rows]
                prompt_logits.append((req, model.compute_logits(hidden[row:row + rows]).float(),
                                      targets))
        for work, _ in pending:
            work.wait()
        if not info.is_last_stage:
            return None
        return StepOutput(sample_reqs, torch.cat(logits) if logits else None, prompt_logits)


@contextlib.contextmanager
def _quiet_loader():
    log = logging.getLogger("octavo.models.loader")
    drop = _DropIgnored()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class _DropIgnored(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ignored ")


def _micro_batches(out: SchedulerOutput, count: int) -> list[SchedulerOutput]:
    """Cut the step's requests into at most `count` contiguous groups of about equal tokens
    (the sampling order stays the step's order)."""
    total = out.num_batched_tokens
    groups, current, acc = [], [], 0
    for s in out.scheduled:
        current.append(s)
        acc += s.num_new_tokens
        if acc * count >= total * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(SchedulerOutput(current))
            current = []
    if current:
        groups.append(SchedulerOutput(current))
    return groups
