"""LLMEngine: requests in, one scheduled forward + sample per step(), RequestOutputs out."""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from octavo.models.gguf_loader import GGUF_SUFFIX, load_gguf_config, load_gguf_tokenizer

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, fill_decoded_tokens
from .executor import make_executor
from .fault_injection import FaultInjector
from .kv_cache import KVCacheManager
from .outputs import CompletionOutput, RequestOutput
from .request import Request, RequestStatus
from .sampler import Sampler, SamplingState, compute_prompt_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


class StepError(RuntimeError):
    """Requests failed inside LLMEngine.step(). `failed` maps their (user) request ids to the
    error; they are finished and their blocks freed. `outputs` are the step's outputs for the
    other requests, which go on. `whole_step` is true when the batch itself failed (the model
    forward), so the error is no request's own fault."""

    def __init__(self, failed: dict[str, BaseException], outputs: list[RequestOutput],
                 whole_step: bool = False, cause: BaseException | None = None) -> None:
        first = cause if cause is not None else next(iter(failed.values()))
        super().__init__(f"{'the engine step' if whole_step else 'requests'} failed "
                         f"({len(failed)} request(s)): {type(first).__name__}: {first}")
        self.failed, self.outputs, self.whole_step, self.cause = failed, outputs, whole_step, first


@dataclass
class _Parent:
    """A user request; n > 1 fans out into n child Requests that share the prompt's blocks
    (or, for state models, start from a snapshot of the first child's state)."""
    request_id: str
    children: list[Request]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        hf_config = _load_hf_config(config)
        config.resolve(hf_config)
        torch.manual_seed(config.seed)
        self.tokenizer = _load_tokenizer(config, hf_config)
        self.generation_config = _load_generation_config(config)
        if self.generation_config is not None and _sampling_defaults(self.generation_config):
            logger.info("default sampling params come from the model's generation_config.json: "
                        "%s (generation_config='octavo' ignores it)",
                        _sampling_defaults(self.generation_config))
        self.eos_token_ids = _eos_ids(hf_config, self.generation_config, self.tokenizer)
        self.vocab_size = hf_config.vocab_size
        self.executor = make_executor(config)
        # the in-process runner (None when workers hold the model)
        self.runner = getattr(self.executor, "runner", None)
        draft = None
        spec = config.speculative_config
        if spec is not None and spec.method == "draft_model":
            from octavo.spec_decode.draft_model import DraftModelProposer
            draft = DraftModelProposer(config, spec.model)
        elif spec is not None and spec.method in ("eagle", "mtp"):
            from octavo.spec_decode.eagle import EagleProposer
            draft = EagleProposer(config, self.runner, spec.model or config.model, spec.method)
        if draft is not None:
            self.runner.extra_bytes_per_block = draft.bytes_per_block()   # same block count
        num_blocks = self.executor.init_kv_cache()
        num_slots = getattr(self.runner or self.executor, "num_state_slots", 0)
        if num_slots and config.enable_prefix_caching:
            # a cached block holds K/V, not the recurrent state after it: a hit could not
            # resume the Mamba layers, so every prompt is computed whole
            logger.info("prefix caching is off: this model keeps a per-request recurrent state "
                        "(Mamba layers) that cached KV blocks cannot restore")
            config.enable_prefix_caching = False
        # State snapshots: beam search and n > 1 start from a copy of a known state (the copies
        # travel with the step, so every rank makes them). enable_state_snapshots=False, or the
        # override OCTAVO_STATE_SNAPSHOTS=0, makes every request compute its whole prompt.
        snapshots = num_slots > 0 and _state_snapshots_on(config)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 num_state_slots=num_slots, state_snapshots=snapshots)
        if snapshots:
            logger.info("state snapshots are on: beam search steps and n > 1 samples start "
                        "from a copy of a known state (--no-enable-state-snapshots turns them "
                        "off)")
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_loras=config.max_loras if config.enable_lora else None)
        self.sampler = Sampler(self.eos_token_ids)
        self.spec = None                  # octavo.spec_decode: drafts proposed, then verified
        if config.speculative_config is not None:
            if num_slots:
                raise ValueError("speculative decoding is not supported for models with a "
                                 "per-request recurrent state (Mamba layers): a rejected draft "
                                 "cannot be taken back out of the state; drop speculative_config")
            from octavo.spec_decode.decoder import SpecDecoder
            if draft is not None:
                draft.bind(self.kv, num_blocks, self.eos_token_ids)
            self.spec = SpecDecoder(config.speculative_config, self.eos_token_ids, draft)
        self.parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, _Parent] = {}
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)

    @classmethod
    def from_config(cls, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> "LLMEngine":
        """vLLM's constructor: an octavo.arg_utils.EngineArgs in, an engine out."""
        return cls(engine_args.create_engine_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---- requests in ------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt must be a string, {'prompt': str} or {'prompt_token_ids': "
                         f"[int, ...]}}, got {type(prompt).__name__}")

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        n, limit = len(prompt_token_ids), self.config.max_model_len
        if n > limit:
            raise ValueError(f"the prompt is {n} tokens long, more than max_model_len={limit}: "
                             "shorten the prompt or raise max_model_len")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.vocab_size})")
        params.verify_token_ids(self.vocab_size)
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if cap >= 0 and asked is not None and asked > cap:
                raise ValueError(f"{name}={asked} is more than this engine allows "
                                 f"(max_logprobs={cap}): ask for at most {cap}, or start the "
                                 "engine with a larger max_logprobs (--max-logprobs)")
        self._verify_params_fit(params)

    def _verify_params_fit(self, params: SamplingParams) -> None:
        """Bounds that depend on the model and the engine, checked at admission (past it, a
        request that does not fit would fail inside a step)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name}={value} is more than the vocabulary size "
                                 f"({self.vocab_size}): ask for at most {self.vocab_size}")
        limit = self.config.max_num_seqs
        for name in ("n", "best_of"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name}={value} is more than max_num_seqs={limit} (the most "
                                 f"sequences a step can run): ask for at most {limit}")

    # ---- LoRA adapters (octavo.lora) ------------------------------------------------------------
    def _lora_manager(self):
        if not self.config.enable_lora:
            raise ValueError("this engine was started without LoRA support: pass "
                             "enable_lora=True (--enable-lora) to use adapters")
        return self.runner.lora

    def add_lora(self, lora_request) -> bool:
        """Load an adapter into the host cache (ValueError if it is bad or does not fit)."""
        from octavo.lora.request import LoRARequest
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be an octavo.lora.request.LoRARequest, got "
                             f"{type(lora_request).__name__}")
        self._lora_manager().add_adapter(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._lora_manager().remove_adapter(lora_int_id)

    def list_loras(self) -> set[int]:
        return {r.lora_int_id for r in self._lora_manager().list_adapters()}

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    lora_request=None) -> None:
        """Validate and queue a request; a bad request raises ValueError and changes nothing."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate(token_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
        bad_words = params.bad_words_token_ids(self.tokenizer) if params.bad_words else None
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + i
            rid = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(rid, token_ids, child_params, self.eos_token_ids, text,
                          self.config.max_model_len, index=i, lora_request=lora_request)
            req.bad_words_token_ids = bad_words
            if params.detokenize:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            children.append(req)
        parent = _Parent(request_id, children)
        self.parents[request_id] = parent
        for req in children:
            self._child_parent[req.request_id] = parent
        # n > 1 with a recurrent state: the siblings start from the first child's state
        self.scheduler.add_forked(children)

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        for rid in ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            for req in parent.children:
                self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
                del self._child_parent[req.request_id]
                if self.spec is not None:
                    self.spec.forget(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's LLM.reset_prefix_cache): later prompts are
        computed whole. Returns False, changing nothing, while a request holds KV blocks."""
        return self.kv.reset_prefix_cache()

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. A failure that can be pinned on a request (its sampling,
        logprobs or detokenization) finishes that request alone; a failing forward finishes
        the step's requests. Either way the failed requests are freed, the others go on, and
        StepError reports both (see StepError)."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        fault = FaultInjector.from_env()
        try:
            if fault is not None:
                fault.before_forward(s.request for s in out.scheduled)
            result = self.executor.execute(out)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail, not the engine
            failed = {self._child_parent[s.request.request_id].request_id: e
                      for s in out.scheduled}
            self.abort_request(list(failed))
            raise StepError(failed, [], whole_step=True, cause=e) from e
        failed: dict[str, BaseException] = {}
        sampled, logprobs = self._sample(out, result, fault, failed)
        for req, logits, targets in result.prompt_logits:
            try:
                entries = compute_prompt_logprobs(logits, targets,
                                                  req.sampling_params.prompt_logprobs)
                fill_decoded_tokens(self.tokenizer, entries)
            except Exception as e:  # noqa: BLE001 - this request's alone
                self._fail_request(req, e, failed)
                continue
            req.prompt_logprobs.extend(entries)
        updated = self.scheduler.update(out, sampled)
        touched: dict[str, _Parent] = {}
        for req, tokens in updated:
            if req.request_id not in self._child_parent:      # failed in this step
                continue
            lps = logprobs.get(req.request_id)
            try:
                for j, token in enumerate(tokens):
                    stopped = self._process_token(req, token,
                                                  lps[j] if isinstance(lps, list) else lps)
                    if stopped and j + 1 < len(tokens):   # a stop string: drop the rest
                        _drop_last(req, len(tokens) - j - 1)
                        break
            except Exception as e:  # noqa: BLE001 - this request's alone
                self._fail_request(req, e, failed)
                continue
            touched[req.request_id] = self._child_parent[req.request_id]
        if self.spec is not None:
            try:
                self.spec.observe(out, result)
                self.spec.propose([req for req, _ in updated])
            except Exception as e:  # noqa: BLE001 - drafts are optional: decode without them
                logger.warning("speculative proposer failed (%s: %s); this step's requests "
                               "decode without drafts", type(e).__name__, e)
                for req, _ in updated:
                    req.spec_token_ids = []
        outputs = [self._make_output(parent) for parent in
                   {id(p): p for p in touched.values() if p.request_id in self.parents}.values()]
        if failed:
            raise StepError(failed, outputs)
        return outputs

    def _sample(self, out: Any, result: Any, fault: FaultInjector | None,
                failed: dict[str, BaseException]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Sample every row at once; if that fails, row by row, so that only the rows that
        fail on their own are failed (a bad row must not take the batch with it). Requests
        that verify drafts get a list of tokens (and of logprob entries) instead."""
        sampled: dict[str, Any] = {}
        logprobs: dict[str, Any] = {}
        reqs = result.sample_requests
        if not reqs:
            return sampled, logprobs
        drafts = {id(s.request): s.spec_token_ids for s in out.scheduled if s.spec_token_ids}
        if drafts:
            reqs, logits = self._verify(reqs, result.logits, drafts, sampled, logprobs, failed)
            result = _Rows(reqs, logits)
            if not reqs:
                return sampled, logprobs
        batch = [SamplingState(r.sampling_params, r.prompt_token_ids, r.output_token_ids,
                               r.generator, r.bad_words_token_ids) for r in reqs]
        try:
            if fault is not None:
                for r in reqs:
                    fault.before_sample(r)
            s = self.sampler(result.logits, batch)
            rows = [(r, tok, lp) for r, tok, lp in zip(reqs, s.sampled_token_ids, s.logprobs)]
        except Exception:  # noqa: BLE001 - find the rows that fail alone
            rows = []
            for i, (r, state) in enumerate(zip(reqs, batch)):
                try:
                    if fault is not None:
                        fault.before_sample(r)
                    s = self.sampler(result.logits[i:i + 1], [state])
                    rows.append((r, s.sampled_token_ids[0], s.logprobs[0]))
                except Exception as e:  # noqa: BLE001 - this request's alone
                    self._fail_request(r, e, failed)
        for r, tok, lp in rows:
            if not 0 <= tok < self.vocab_size:   # non-finite logits: never feed it back
                self._fail_request(r, RuntimeError(
                    f"sampled token id {tok} is outside the vocabulary [0, {self.vocab_size}) "
                    "(non-finite logits?)"), failed)
                continue
            sampled[r.request_id] = tok
            logprobs[r.request_id] = lp
        return sampled, logprobs

    def _verify(self, reqs: list[Request], logits: torch.Tensor, drafts: dict[int, list[int]],
                sampled: dict[str, Any], logprobs: dict[str, Any],
                failed: dict[str, BaseException]) -> tuple[list[Request], torch.Tensor]:
        """Run the rejection sampler on the requests that verify drafts (1 + k logits rows
        each); returns the other requests and their rows, which sample as usual."""
        plain, plain_rows, spec_reqs, spec_rows, row = [], [], [], [], 0
        for r in reqs:
            d = drafts.get(id(r))
            if d:
                spec_reqs.append(r)
                spec_rows.extend(range(row, row + 1 + len(d)))
                row += 1 + len(d)
            else:
                plain.append(r)
                plain_rows.append(row)
                row += 1
        spec_drafts = [drafts[id(r)] for r in spec_reqs]
        try:
            emitted, lps = self.spec.verify(spec_reqs, spec_drafts, logits[spec_rows])
        except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
            for r in spec_reqs:
                self._fail_request(r, e, failed)
            emitted, lps = [], []
        for r, tokens, lp in zip(spec_reqs, emitted, lps):
            if not all(0 <= t < self.vocab_size for t in tokens):
                self._fail_request(r, RuntimeError(
                    f"sampled token ids {tokens} are outside the vocabulary "
                    f"[0, {self.vocab_size}) (non-finite logits?)"), failed)
                continue
            sampled[r.request_id] = tokens
            logprobs[r.request_id] = lp
        return plain, logits[plain_rows]

    def _fail_request(self, req: Request, error: BaseException,
                      failed: dict[str, BaseException]) -> None:
        """Finish the user request `req` belongs to (all its n samples) and free its blocks."""
        parent = self._child_parent.get(req.request_id)
        if parent is None:
            return
        logger.error("request %s failed inside a step: %s: %s", parent.request_id,
                     type(error).__name__, error)
        failed[parent.request_id] = error
        self.abort_request(parent.request_id)

    def _process_token(self, req: Request, token: int, lp: dict | None) -> bool:
        """Record one new token (logprobs, text); True when its text hit a stop string."""
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if lp is not None:
            fill_decoded_tokens(self.tokenizer, [lp])
            req.logprobs.append(lp)
            req.cumulative_logprob += lp[token].logprob
        if req.detokenizer is None:
            return False
        params = req.sampling_params
        stopped_by_token = (req.status == RequestStatus.FINISHED_STOPPED)
        if stopped_by_token and not params.include_stop_str_in_output:
            return False                             # EOS / stop id: its text is not output
        stop = req.detokenizer.update([token])
        if stop is not None:                         # a stop string outranks the length limit
            self.scheduler.finish_request(req, RequestStatus.FINISHED_STOPPED)
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = stop
            return True
        return False

    def _make_output(self, parent: _Parent) -> RequestOutput:
        finished = all(c.is_finished for c in parent.children)
        first = parent.children[0]
        completions = [CompletionOutput(
            index=c.index,
            text=c.detokenizer.output_text if c.detokenizer is not None else "",
            token_ids=list(c.output_token_ids),
            cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
            logprobs=c.logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        ) for c in parent.children]
        if finished:
            del self.parents[parent.request_id]
            for c in parent.children:
                del self._child_parent[c.request_id]
        return RequestOutput(request_id=parent.request_id, prompt=first.prompt,
                             prompt_token_ids=first.prompt_token_ids,
                             prompt_logprobs=first.prompt_logprobs, outputs=completions,
                             finished=finished, num_cached_tokens=max(first.num_cached_tokens, 0))

    def get_default_sampling_params(self) -> SamplingParams:
        if self.generation_config is None:
            return SamplingParams()
        return SamplingParams(**_sampling_defaults(self.generation_config))


def _state_snapshots_on(config: EngineConfig) -> bool:
    """config.enable_state_snapshots, unless OCTAVO_STATE_SNAPSHOTS (0 or 1) says otherwise."""
    env = os.environ.get("OCTAVO_STATE_SNAPSHOTS")
    if env is None:
        return config.enable_state_snapshots
    if env not in ("0", "1"):
        raise ValueError(f"OCTAVO_STATE_SNAPSHOTS must be 0 or 1, got {env!r}: unset it or use "
                         "enable_state_snapshots")
    return env == "1"


def _load_hf_config(config: EngineConfig) -> Any:
    if config.model.endswith(GGUF_SUFFIX):
        try:
            return load_gguf_config(config.model, trust_remote_code=config.trust_remote_code)
        except (OSError, KeyError) as e:
            raise ValueError(f"could not read the GGUF metadata of {config.model!r}: {e}") from e
    if not os.path.isdir(config.model):
        raise ValueError(f"model {config.model!r} is not a local directory or .gguf file; octavo "
                         "loads Hugging Face model directories (config.json + *.safetensors) "
                         "and GGUF files from disk")
    from .hf_config import load_hf_config

    try:
        return load_hf_config(config.model, trust_remote_code=config.trust_remote_code,
                              revision=config.revision)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not read the model config in {config.model!r}: {e}") from e


_GEN_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
               "min_p": "min_p"}


def _load_tokenizer(config: EngineConfig, hf_config: Any) -> Any:
    if config.tokenizer is None and config.model.endswith(GGUF_SUFFIX):
        return load_gguf_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    from .hf_config import load_tokenizer
    # (revision and cache directory matter when the tokenizer is a Hub id; a local path has none)
    return load_tokenizer(config.tokenizer or config.model,
                          hf_config=hf_config if config.tokenizer is None else None,
                          trust_remote_code=config.trust_remote_code,
                          revision=config.tokenizer_revision, cache_dir=config.download_dir)


def _sampling_defaults(gen: GenerationConfig) -> dict[str, Any]:
    """SamplingParams fields the generation config sets (as vLLM: only values it sets
    explicitly, and only these fields; do_sample is ignored)."""
    values = gen.to_diff_dict()
    return {ours: values[theirs] for theirs, ours in _GEN_FIELDS.items()
            if values.get(theirs) is not None}


def _load_generation_config(config: EngineConfig) -> GenerationConfig | None:
    """The model's generation_config.json ("auto": next to the weights; or a directory), or
    none ("octavo")."""
    if config.generation_config == "octavo":
        return None
    path = config.generation_config
    if path == "auto":
        path = os.path.dirname(config.model) if config.model.endswith(GGUF_SUFFIX) else config.model
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _eos_ids(hf_config: Any, gen: GenerationConfig | None, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen_eos = gen.eos_token_id if gen is not None else None
    for value in (gen_eos, getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v not in ids:
                ids.append(v)
    return tuple(ids)


@dataclass
class _Rows:
    """The sampling requests and their logits rows once the draft-verifying rows are out."""
    sample_requests: list[Request]
    logits: torch.Tensor


def _drop_last(req: Request, n: int) -> None:
    """Take back the last n tokens of a finished request (emitted in the same step after the
    one that stopped it, never recorded: no logprobs, no text), so that its output is what
    decoding one token at a time gives."""
    del req.output_token_ids[-n:]
    del req.all_token_ids[-n:]


_counter = itertools.count()


def next_request_id() -> str:
    return str(next(_counter))
