"""ModelRunner: loads the model, owns the KV cache and turns a scheduler step into one forward.

The flat batch is every scheduled token of every request, back to back; attention finds each
request's rows through `query_start_loc` and its context through its block table. Inputs go
through preallocated buffers (no per-step allocation); decode-only steps go through the
fixed-size static buffers of decode_graphs.py, replayed as CUDA graphs on a GPU.

Layers with a per-request state (Mamba) get slot tensors [1 + num_slots, ...] instead of blocks:
a request's slot s (from the KV manager) is row s + 1; row 0 is scratch for padding rows.
A step's `state_copies` (state snapshots taken or restored) and `block_copies` (the partial K/V
block of a restored hybrid request) run before its forward.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from octavo.models.layers.attention import Attention, AttentionMetadata
from octavo.models.layers.cache_spec import CacheLayer, StateSpec
from octavo.models.loader import load_weights
from octavo.models.registry import get_model_class

from . import weight_memory
from .config import EngineConfig
from .decode_graphs import DecodeGraphs, decode_batch_sizes
from .kv_cache import split_cache_budget
from .request import Request
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class StepInputs:
    """One step's flat batch, as views into the runner's buffers."""
    input_ids: torch.Tensor                 # [T] int64
    positions: torch.Tensor                 # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor               # [R] int64: rows whose logits are due (see StepOutput)
    sample_requests: list[Request]
    # requests that asked for prompt logprobs: (request, first row, rows, first target position)
    prompt_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)


@dataclass
class StepOutput:
    sample_requests: list[Request]
    # [R, vocab] float32: one row per sampling request, 1 + len(spec_token_ids) for those that
    # verify drafts (in the step's order)
    logits: torch.Tensor | None
    prompt_logits: list[tuple[Request, torch.Tensor, list[int]]]   # (req, [P, vocab], targets)
    hidden: torch.Tensor | None = None      # [T, hidden] when the runner keeps it (EAGLE)


class InputBuffers:
    """Preallocated host-side inputs, sized for the largest step the scheduler can make."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        self.input_ids = np.zeros(max_tokens, dtype=np.int64)
        self.positions = np.zeros(max_tokens, dtype=np.int64)
        self.slot_mapping = np.full(max_tokens, -1, dtype=np.int64)
        self.query_start_loc = np.zeros(max_seqs + 1, dtype=np.int32)
        self.seq_lens = np.zeros(max_seqs, dtype=np.int32)
        self.block_table = np.zeros((max_seqs, max_blocks), dtype=np.int32)
        self.state_indices = np.zeros(max_seqs, dtype=np.int32)      # row of the state slot
        self.has_initial_state = np.zeros(max_seqs, dtype=np.bool_)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cls: type | None = None) -> None:
        """model_cls: a class instead of the one the config's architecture names (a draft
        head such as EAGLE's, which is no model of its own)."""
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        hf_config = config.hf_config
        model_cls = model_cls or get_model_class(hf_config)
        t0 = time.perf_counter()
        huge = (weight_memory.HugePageWeights() if self.device.type == "cpu" and weight_memory.enabled()
                else contextlib.nullcontext())
        with _default_dtype(self.dtype), self.device, huge:
            self.model = model_cls(hf_config)
        load_weights(self.model, config.model, config.quantization)
        for module in self.model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        self.model.eval()
        logger.info("loaded %s in %.2fs", model_cls.__name__, time.perf_counter() - t0)
        self.lora = None                  # octavo.lora: adapters in slots, per-token slot indices
        if config.enable_lora:
            from octavo.lora.manager import LoRAManager
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank,
                                    config.max_cpu_loras, config.max_num_batched_tokens,
                                    self.device, self.dtype,
                                    always=self.device.type == "cuda" and not config.enforce_eager)
        # every module that keeps a cache (paged K/V, MLA latent, ...), each with its own spec
        self.cache_layers = [m for m in self.model.modules() if isinstance(m, CacheLayer)]
        self.attn_layers = [m for m in self.cache_layers if isinstance(m, Attention)]
        # per-request state layers (Mamba) hold slots; the others are paged
        self.state_layers = [m for m in self.cache_layers if isinstance(m.cache_spec(), StateSpec)]
        self.paged_layers = [m for m in self.cache_layers if m not in self.state_layers]
        if config.kv_cache_dtype == "fp8":
            latent = [m for m in self.paged_layers if not isinstance(m, Attention)]
            if latent:
                raise ValueError(f"kv_cache_dtype='fp8' covers paged K/V attention; "
                                 f"{model_cls.__name__}'s {type(latent[0]).__name__} keeps a "
                                 f"latent cache octavo does not quantize yet: use "
                                 f"kv_cache_dtype='auto'")
            for m in self.attn_layers:
                m.kv_cache_dtype = torch.float8_e4m3fn
        # calculate_kv_scales: the first step with tokens sets every layer's K/V scales
        self._kv_scales_pending = config.kv_cache_dtype == "fp8" and config.calculate_kv_scales
        # a state model runs tensor parallel where its class says so (its mixers replicated)
        tp_ok = getattr(model_cls, "supports_tensor_parallel", False)
        if self.state_layers and (config.pipeline_parallel_size > 1
                                  or (config.tensor_parallel_size > 1 and not tp_ok)):
            change = "pipeline_parallel_size=1" + ("" if tp_ok else " and tensor_parallel_size=1")
            raise ValueError(f"{model_cls.__name__} keeps a per-request state (Mamba layers), which "
                             f"octavo does not split over {'stages' if tp_ok else 'ranks'}: use "
                             f"{change}")
        self.num_state_slots = 0
        self._state_tensors: list[torch.Tensor] = []
        self._paged_tensors: list[torch.Tensor] = []      # [num_blocks, ...] each
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.buf = InputBuffers(config.max_num_batched_tokens, config.max_num_seqs,
                                self.max_blocks_per_seq)
        self.num_blocks = 0
        # bytes per block of other caches that share this block table (a draft model's)
        self.extra_bytes_per_block = 0
        self.keep_hidden = False          # StepOutput.hidden: the final hidden state of each row
        self.decode_graphs: DecodeGraphs | None = None
        # a model with an op that has no CUDA kernel yet (its reference syncs with the host)
        # declares cuda_graphs = False and decodes eagerly on CUDA
        capturable = self.device.type != "cuda" or getattr(model_cls, "cuda_graphs", True)
        if not config.enforce_eager and capturable:
            sizes = decode_batch_sizes(config.max_num_seqs, config.max_num_batched_tokens)
            self.decode_graphs = DecodeGraphs(self.model, sizes, self.max_blocks_per_seq,
                                              config.max_model_len, self.device)

    # ---- KV cache -------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        """Bytes of one block (block_size tokens) summed over every paged layer's cache spec."""
        return sum(m.cache_spec().page_bytes(self.block_size, self.dtype) for m in self.paged_layers)

    def bytes_per_slot(self) -> int:
        """Bytes of one request's state summed over the state layers (0 without any)."""
        return sum(m.cache_spec().slot_bytes(self.dtype) for m in self.state_layers)

    def _allocate(self, num_blocks: int, num_slots: int | None = None) -> None:
        self._paged_tensors = []
        for m in self.paged_layers:
            caches = m.cache_spec().allocate(num_blocks, self.block_size, self.dtype, self.device)
            m.bind_cache(caches)
            self._paged_tensors.extend(caches)
        num_slots = self.num_state_slots if num_slots is None else num_slots
        self._state_tensors = []
        for m in self.state_layers:               # + row 0: scratch of padding rows
            caches = m.cache_spec().allocate_slots(num_slots + 1, self.dtype, self.device)
            m.bind_cache(caches)
            self._state_tensors.extend(caches)

    def init_kv_cache(self) -> int:
        """Turn the KV budget into blocks. On CUDA the budget is what one max-size forward
        (profile_run) leaves free; on the CPU it is the kv_cache_memory setting, so no forward
        runs (at max_model_len 8192 it took most of the start-up time and measured nothing)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.profile_run()
        per_block = self.bytes_per_block() + self.extra_bytes_per_block
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info()[1]
            budget = int(total * self.config.gpu_memory_utilization) - torch.cuda.max_memory_allocated()
            hint = "raise gpu_memory_utilization"
        else:
            budget = self.config.kv_cache_memory
            hint = "raise kv_cache_memory (bytes)"
        if self.state_layers:
            return self._init_with_state(budget, per_block, hint)
        num_blocks = max(0, budget // per_block)
        needed = self.max_blocks_per_seq
        if num_blocks < needed:
            raise ValueError(
                f"max_model_len={self.config.max_model_len} needs {needed} KV blocks of "
                f"{self.block_size} tokens ({needed * per_block} bytes) but the KV budget of "
                f"{budget} bytes holds only {num_blocks}: {hint} to at least "
                f"{needed * per_block}, or lower max_model_len")
        self._allocate(num_blocks)
        self.num_blocks = num_blocks
        if self.decode_graphs is not None and self.device.type == "cuda":
            self.decode_graphs.capture()
        return num_blocks

    def _init_with_state(self, budget: int, per_block: int, hint: str) -> int:
        try:
            num_blocks, num_slots = split_cache_budget(
                budget, per_block, self.bytes_per_slot(), self.config.max_num_seqs,
                self.max_blocks_per_seq if self.paged_layers else 0)
        except ValueError as e:
            raise ValueError(f"{e} ({hint})") from None
        self.num_state_slots = num_slots
        self._allocate(num_blocks, num_slots)
        self.num_blocks = num_blocks
        logger.info("state cache: %d slots of %d bytes%s", num_slots, self.bytes_per_slot(),
                    f", KV cache: {num_blocks} blocks" if self.paged_layers else "")
        if self.decode_graphs is not None and self.device.type == "cuda":
            self.decode_graphs.capture()
        return num_blocks

    @torch.inference_mode()
    def profile_run(self) -> None:
        cfg = self.config
        total = cfg.max_num_batched_tokens
        seq_len = min(cfg.max_model_len, total)
        lens = [seq_len] * (total // seq_len) + ([total % seq_len] if total % seq_len else [])
        lens = lens[:cfg.max_num_seqs]
        blocks_each = [-(-n // self.block_size) for n in lens]
        self._allocate(sum(blocks_each), len(lens))
        reqs, next_block = [], 0
        for i, n in enumerate(lens):
            r = _DummyRequest(f"profile-{i}", n, list(range(next_block, next_block + blocks_each[i])))
            r.state_slot = i
            next_block += blocks_each[i]
            reqs.append(r)
        from .scheduler import ScheduledRequest
        out = SchedulerOutput([ScheduledRequest(r, n, 0) for r, n in zip(reqs, lens)])
        self.execute(out)
        for m in self.cache_layers:
            m.bind_cache(None)
        self._state_tensors = []
        self._paged_tensors = []

    # ---- one step ---------------------------------------------------------------------------
    def _fill_host(self, out: SchedulerOutput) -> tuple[int, list[int], list[Request], list]:
        """Write the step's flat batch into the host buffers; returns (tokens, sample rows,
        sampling requests, prompt-logprob rows)."""
        b, bs = self.buf, self.block_size
        t = 0
        sample_rows, sample_reqs, prompt_rows = [], [], []
        b.query_start_loc[0] = 0
        for i, s in enumerate(out.scheduled):
            req, start, n = s.request, s.start, s.num_new_tokens
            end = start + n
            spec = s.spec_token_ids               # drafts to verify, after the known tokens
            b.input_ids[t:t + n - len(spec)] = req.all_token_ids[start:end - len(spec)]
            if spec:
                b.input_ids[t + n - len(spec):t + n] = spec
            pos = b.positions[t:t + n]
            pos[:] = np.arange(start, end)
            if self.paged_layers:
                table = np.asarray(req.block_ids, dtype=np.int64)
                b.slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
                b.block_table[i, :len(table)] = table
            if self.state_layers:
                b.state_indices[i] = req.state_slot + 1
                b.has_initial_state[i] = start > 0
            b.seq_lens[i] = end
            b.query_start_loc[i + 1] = t + n
            if req.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                rows = min(end, req.num_prompt_tokens - 1) - start
                prompt_rows.append((req, t, rows, start + 1))
            t += n
            if s.samples:                          # the last token's row and each draft's
                sample_rows.extend(range(t - 1 - len(spec), t))
                sample_reqs.append(req)
        return t, sample_rows, sample_reqs, prompt_rows

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        b = self.buf
        t, sample_rows, sample_reqs, prompt_rows = self._fill_host(out)
        S = len(out.scheduled)
        max_blocks = max(len(s.request.block_ids) for s in out.scheduled)
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(b.slot_mapping[:t]).to(dev),
            query_start_loc=torch.from_numpy(b.query_start_loc[:S + 1]).to(dev),
            seq_lens=torch.from_numpy(b.seq_lens[:S]).to(dev),
            block_table=torch.from_numpy(b.block_table[:S, :max_blocks]).to(dev),
            max_query_len=max(s.num_new_tokens for s in out.scheduled),
            max_seq_len=int(b.seq_lens[:S].max()),
        )
        if self.state_layers:
            attn.state_indices = torch.from_numpy(b.state_indices[:S]).to(dev)
            attn.has_initial_state = torch.from_numpy(b.has_initial_state[:S]).to(dev)
        return StepInputs(torch.from_numpy(b.input_ids[:t]).to(dev),
                          torch.from_numpy(b.positions[:t]).to(dev), attn,
                          torch.tensor(sample_rows, dtype=torch.int64, device=dev),
                          sample_reqs, prompt_rows)

    def _copy_states(self, out: SchedulerOutput) -> None:
        """State snapshots taken and restored (slot to slot, in order: a later copy may read a
        slot an earlier one wrote), and the partial K/V blocks of the restored requests."""
        for src, dst in out.state_copies:
            if src != dst:
                for t in self._state_tensors:
                    t[dst + 1].copy_(t[src + 1])
        for src, dst in out.block_copies:
            if src != dst:
                for t in self._paged_tensors:
                    t[dst].copy_(t[src])

    def _reset_new_states(self, out: SchedulerOutput) -> None:
        """Zero the state slots of requests that start this step (new, or recomputed after
        preemption): the decode ops read a slot's state without a has_initial_state flag."""
        rows = [s.request.state_slot + 1 for s in out.scheduled if s.start == 0]
        if rows:
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            for t in self._state_tensors:
                t.index_fill_(0, index, 0)

    def prepare_states(self, out: SchedulerOutput) -> None:
        """Before a step's forward (on every rank): its snapshot copies, then zeroed slots for
        the requests that start."""
        if self._state_tensors:
            self._copy_states(out)
            self._reset_new_states(out)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepOutput:
        if self._kv_scales_pending and any(s.num_new_tokens for s in out.scheduled):
            return self._execute_calculating_kv_scales(out)
        self.prepare_states(out)
        bucket = None
        if self.decode_graphs is not None:
            bucket = self.decode_graphs.bucket([s.num_new_tokens for s in out.scheduled])
        if self.lora is not None:
            self.lora.prepare_step([(getattr(s.request, "lora_request", None), s.num_new_tokens)
                                    for s in out.scheduled], bucket or 0)
        if bucket is not None:     # decode-only step: static buffers (and a graph on CUDA)
            n, sample_rows, sample_reqs, prompt_rows = self._fill_host(out)
            hidden = self.decode_graphs.run(self.buf, n, bucket)
            sample_rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        else:
            inputs = self.prepare(out)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn)
            sample_rows, sample_reqs, prompt_rows = (inputs.sample_rows, inputs.sample_requests,
                                                     inputs.prompt_rows)
        logits = None
        if sample_reqs:
            logits = self.model.compute_logits(hidden[sample_rows]).float()
        prompt_logits = []
        for req, row, rows, first in prompt_rows:
            targets = req.prompt_token_ids[first:first + rows]
            prompt_logits.append((req, self.model.compute_logits(hidden[row:row + rows]).float(), targets))
        kept = None
        if self.keep_hidden:
            kept = hidden[:sum(s.num_new_tokens for s in out.scheduled)]
        return StepOutput(sample_reqs, logits, prompt_logits, kept)

    def _execute_calculating_kv_scales(self, out: SchedulerOutput) -> StepOutput:
        """calculate_kv_scales: the first step with tokens runs eagerly from Python, each
        attention layer setting its K/V scales from its K and V before writing them; decode
        graphs captured with the old scales are captured again."""
        for m in self.attn_layers:
            m.calculate_kv_scales = True
        Attention.cache_bindings += 1      # a decoder plan built before now (it would skip them)
        self._kv_scales_pending = False
        graphs, self.decode_graphs = self.decode_graphs, None
        try:
            return self.execute(out)
        finally:
            self.decode_graphs = graphs
            for m in self.attn_layers:
                m.calculate_kv_scales = False
            logger.info("fp8 KV cache scales from the first batch: k %s, v %s",
                        [round(m.k_scale, 6) for m in self.attn_layers[:4]],
                        [round(m.v_scale, 6) for m in self.attn_layers[:4]])
            if graphs is not None and self.device.type == "cuda" and self.num_blocks:
                graphs.capture()


class _DummyRequest:
    """Just enough of a Request for the profiling forward."""

    def __init__(self, request_id: str, n: int, block_ids: list[int]) -> None:
        self.request_id = request_id
        self.all_token_ids = [0] * n
        self.block_ids = block_ids
        self.state_slot: int | None = None
        self.num_prompt_tokens = n
        self.prompt_logprobs = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)
