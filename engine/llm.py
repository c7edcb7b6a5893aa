"""LLM: the offline API (`LLM(model=...).generate(prompts, sampling_params)`)."""
from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from .beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from .chat_utils import apply_chat_template, encode_chat_prompt
from .config import EngineConfig
from .llm_engine import LLMEngine, PromptType, next_request_id
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Load a model (a local Hugging Face directory, a GGUF file or a Hugging Face Hub id:
    octavo.model_source) and generate from batches of prompts. With no model, the default
    model (SmolLM2-135M-Instruct, Q4_1 GGUF) is used, fetched into octavo's cache on first use.

    Keyword arguments are EngineConfig's fields (dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, block_size, enable_prefix_caching, kv_cache_memory, seed, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: Any = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is a string, {"prompt_token_ids": [...]} or {"prompt": str}. Every prompt is
        validated before any is queued: one bad prompt raises ValueError naming it and leaves
        the engine as it was. lora_request: one octavo.lora.LoRARequest for every prompt, or a
        list with one (or None: the base model) per prompt; needs enable_lora=True.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: "
                                 "pass one, or one per prompt")
        loras = _per_prompt_loras(lora_request, len(prompts))
        engine = self.llm_engine
        checked = []
        for i, (prompt, p, lora) in enumerate(zip(prompts, params, loras)):
            try:
                _, ids = engine.tokenize_prompt(prompt)
                engine.validate(ids, p)
                if lora is not None:
                    engine.add_lora(lora)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from e
            checked.append(({"prompt": prompt, "prompt_token_ids": ids}
                             if isinstance(prompt, str) else prompt))
        ids = []
        for prompt, p, lora in zip(checked, params, loras):
            rid = next_request_id()
            engine.add_request(rid, prompt, p, lora_request=lora)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None,
             lora_request: Any = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to
        a list of conversations, rendered with the tokenizer's chat template (or
        `chat_template`, a Jinja string; see `octavo.chat_utils.load_chat_template` for files).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages, or a list of "
                             "conversations (lists of messages)")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = []
        for i, conversation in enumerate(conversations):
            try:
                text = apply_chat_template(
                    tokenizer, conversation, chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, tools=tools,
                    chat_template_kwargs=chat_template_kwargs)
            except ValueError as e:
                raise ValueError(e if len(conversations) == 1 else
                                 f"conversation {i}: {e}") from e
            prompts.append({"prompt": text,
                            "prompt_token_ids": encode_chat_prompt(tokenizer, text)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def beam_search(self, prompts: PromptType | Sequence[PromptType],
                    params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search (octavo.beam_search) for every prompt; outputs in prompt order."""
        return beam_search(self, prompts, params, use_tqdm)

    def list_loras(self) -> set[int]:
        return self.llm_engine.list_loras()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (as vLLM's): False while requests still hold KV blocks."""
        return self.llm_engine.reset_prefix_cache()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in done])
            raise
        finally:
            bar.close()
        return [done[r] for r in request_ids]


def _per_prompt_loras(lora_request: Any, n: int) -> list[Any]:
    """One LoRARequest (or None) per prompt from generate's lora_request argument."""
    if lora_request is None or not isinstance(lora_request, (list, tuple)):
        return [lora_request] * n
    if len(lora_request) != n:
        raise ValueError(f"got {len(lora_request)} lora_requests for {n} prompts: pass one, or "
                         "one (or None) per prompt")
    return list(lora_request)
