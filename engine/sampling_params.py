"""SamplingParams: how to sample one request, with vLLM's fields, defaults and validation."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (argmax), as in vLLM.
_SAMPLING_EPS = 1e-5
# Positive temperatures below this are raised to it to avoid inf/nan in logits / temperature.
_MIN_TEMP = 1e-2


@dataclass
class SamplingParams:
    """Sampling parameters for text generation (see vLLM's SamplingParams for each field).

    top_k: 0 or -1 disables top-k. max_tokens=None means "up to the model's context length".
    logprobs / prompt_logprobs: number of top logprobs to return per token (the sampled /
    prompt token is always included too); None returns none.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    # Characters of output text to hold back while streaming, so that a stop string that is
    # only partly generated is never shown (set in __post_init__).
    output_text_buffer_length: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        # vLLM raises every temperature in (0, 0.01) to 0.01; here those below _SAMPLING_EPS
        # stay greedy, as the docs promise.
        if _SAMPLING_EPS <= self.temperature < _MIN_TEMP:
            logger.warning("temperature %s is below %s and may give inf/nan; using %s.",
                           self.temperature, _MIN_TEMP, _MIN_TEMP)
            self.temperature = _MIN_TEMP
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        self.bad_words = list(dict.fromkeys(self.bad_words or []))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.is_greedy:
            # Greedy ignores the truncation knobs; normalize them so the sampler can skip them.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or self.best_of < self.n:
                raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} "
                                 f"and best_of={self.best_of}.")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not -(1 << 63) <= self.seed <= (1 << 63) - self.n):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63 - n], got {self.seed}.")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise ValueError("repetition_penalty must be a finite number greater than zero, "
                             f"got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise ValueError(
                f"temperature must be a finite non-negative number, got {self.temperature}.")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer, got {type(self.top_k).__name__}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to "
                             f"max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if not all(isinstance(s, str) for s in self.stop) or any(not s for s in self.stop):
            raise ValueError(f"stop must contain only non-empty strings, got {self.stop}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError(
                f"bad_words cannot contain an empty string, got bad_words={self.bad_words}.")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("allowed_token_ids must not be empty when given.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def sampling_type(self) -> str:
        """"greedy", "random_seed" or "random" (vLLM's SamplingType, as a string)."""
        if self.is_greedy:
            return "greedy"
        return "random" if self.seed is None else "random_seed"

    def clone(self) -> "SamplingParams":
        """A deep copy, so the engine can own (and mutate) its copy of a user's params."""
        return copy.deepcopy(self)

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if logit_bias / allowed_token_ids / stop_token_ids leave the vocab."""
        checks = (("logit_bias", list(self.logit_bias or {})),
                  ("allowed_token_ids", list(self.allowed_token_ids or [])),
                  ("stop_token_ids", list(self.stop_token_ids)))
        for name, ids in checks:
            bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
            if bad:
                raise ValueError(f"token_id(s) {bad} in {name} are out of vocabulary: every "
                                 f"token id must satisfy 0 <= token_id < {vocab_size}.")

    def bad_words_token_ids(self, tokenizer) -> list[list[int]]:
        """Token id sequences to ban, from bad_words (vLLM's rule).

        Each word is encoded without and with a leading space (a word at the start of the text
        and in the middle tokenize differently). The spaced form is kept only when it is a
        different token sequence of the same length. The sampler bans the last token of a
        sequence when the tokens before it were the last ones generated.
        """
        result: list[list[int]] = []
        vocab_size = len(tokenizer)
        for word in self.bad_words:
            plain: list[int] | None = None
            for prefix in ("", " "):
                ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
                if not ids:
                    if not prefix:
                        raise ValueError(f"bad_words entry {word!r} tokenizes to no tokens.")
                    continue
                if not prefix:
                    plain = ids
                    result.append(ids)
                elif ids[0] != plain[0] and len(ids) == len(plain):
                    result.append(ids)
        bad = [t for ids in result for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"bad_words give token ids {bad} outside the tokenizer's "
                             f"vocabulary of {vocab_size}.")
        return result


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}.")


def _normalize_logit_bias(logit_bias: dict) -> dict[int, float]:
    """Keys to int (the OpenAI API sends strings), biases clamped to [-100, 100] as in vLLM."""
    out: dict[int, float] = {}
    for token, bias in logit_bias.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {token!r} is not an integer token id.") from None
        out[token_id] = min(100.0, max(-100.0, float(bias)))
    return out
