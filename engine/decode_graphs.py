"""Decode steps on fixed batch-size buckets: static input buffers, padding, and on CUDA one
captured graph per bucket, replayed from those buffers.

Bucket choice, padding and the copy into the static buffers are the same on every device; on
the CPU the padded batch runs eagerly, so every CPU test exercises this path. A padding row is a
one-token sequence whose token is never written to the cache (slot -1) and whose attention
reads one key of block 0 (seq_len 1); its output row is dropped. In models with a per-request
state (Mamba) a padding row uses state row 0, the runner's scratch slot.
"""
from __future__ import annotations

import bisect
import logging

import torch

from octavo.models.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 512


def decode_batch_sizes(max_num_seqs: int, max_num_batched_tokens: int,
                       limit: int = MAX_GRAPH_BATCH) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to the largest decode batch the scheduler can
    make (which is always a bucket itself)."""
    top = min(max_num_seqs, max_num_batched_tokens, limit)
    sizes = {s for s in (1, 2, 4, 8) if s <= top} | set(range(16, top + 1, 16)) | {top}
    return sorted(sizes)


def pick_bucket(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds num_seqs decode rows, or None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class StaticDecodeInputs:
    """Device buffers for the largest bucket; a bucket of size bs uses their first bs rows."""

    def __init__(self, max_bs: int, max_blocks: int, device: torch.device) -> None:
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_bs, dtype=i64, device=device)         # [B]
        self.positions = torch.zeros(max_bs, dtype=i64, device=device)         # [B]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=i64, device=device)  # [B]
        # one query row per sequence, so query_start_loc is fixed: [B+1] = 0, 1, ..., B
        self.query_start_loc = torch.arange(max_bs + 1, dtype=i32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=i32, device=device)           # [B]
        self.block_table = torch.zeros(max_bs, max_blocks, dtype=i32, device=device)  # [B, M]
        self.state_indices = torch.zeros(max_bs, dtype=i32, device=device)     # [B]
        self.has_initial_state = torch.ones(max_bs, dtype=torch.bool, device=device)  # [B]

    def load(self, host, n: int, bs: int) -> None:
        """Copy the n real rows of the host InputBuffers into rows [0, n); pad rows [n, bs)."""
        host.input_ids[n:bs] = 0
        host.positions[n:bs] = 0
        host.slot_mapping[n:bs] = -1
        host.seq_lens[n:bs] = 1
        host.block_table[n:bs] = 0
        host.state_indices[n:bs] = 0
        host.has_initial_state[n:bs] = True
        for dst, src in ((self.input_ids, host.input_ids), (self.positions, host.positions),
                         (self.slot_mapping, host.slot_mapping), (self.seq_lens, host.seq_lens),
                         (self.block_table, host.block_table),
                         (self.state_indices, host.state_indices),
                         (self.has_initial_state, host.has_initial_state)):
            dst[:bs].copy_(torch.from_numpy(src[:bs]), non_blocking=True)

    def view(self, bs: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        md = AttentionMetadata(slot_mapping=self.slot_mapping[:bs],
                               query_start_loc=self.query_start_loc[:bs + 1],
                               seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs],
                               max_query_len=1, max_seq_len=max_seq_len,
                               state_indices=self.state_indices[:bs],
                               has_initial_state=self.has_initial_state[:bs])
        return self.input_ids[:bs], self.positions[:bs], md


class DecodeGraphs:
    """Runs decode-only steps through the static buffers: graph replay where captured, else the
    model eagerly on the padded batch."""

    def __init__(self, model: torch.nn.Module, sizes: list[int], max_blocks: int,
                 max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.inputs = StaticDecodeInputs(sizes[-1], max_blocks, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}     # bucket -> static hidden states [bs, H]

    def bucket(self, num_new_tokens: list[int]) -> int | None:
        """The bucket for a step, or None unless every request decodes exactly one token."""
        if any(n != 1 for n in num_new_tokens):
            return None
        return pick_bucket(len(num_new_tokens), self.sizes)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool. Needs the KV
        cache allocated; the buffers' padding (slot -1) keeps the cache untouched."""
        pool = None
        for bs in reversed(self.sizes):
            ids, pos, md = self.inputs.view(bs, self.max_model_len)
            self.model(ids, pos, md)                     # warm-up: lazy init outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model(ids, pos, md)
            except RuntimeError as e:
                raise RuntimeError(f"capturing the decode CUDA graph for batch size {bs} failed "
                                   f"({e}); pass enforce_eager=True to run without CUDA graphs") from e
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def run(self, host, n: int, bs: int) -> torch.Tensor:
        """Hidden states [n, H] of a decode step whose host buffers hold n rows."""
        self.inputs.load(host, n, bs)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        ids, pos, md = self.inputs.view(bs, self.max_model_len)
        return self.model(ids, pos, md)[:n]
