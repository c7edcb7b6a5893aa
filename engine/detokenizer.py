"""Incremental detokenization of one request's output tokens, and stop-string checks.

Uses the tokenizers library's streaming decoder (tokenizers.decoders.DecodeStream) on the
backend of a transformers fast tokenizer. The stream is primed with the end of the prompt, so
the first output token's leading space comes out as it would in decode(prompt + output)
(Llama-style "▁" decoders strip a leading space at the start of a text). For byte-level
tokenizers the text equals tokenizer.decode(output_ids); for all, it equals
decode(prompt + output)[len(decode(prompt)):] for ordinary text.

Known DecodeStream limits (as in vLLM's FastIncrementalDetokenizer):
  * it never puts spaces between special tokens, so spaces_between_special_tokens has no effect;
  * bytes of an incomplete UTF-8 character at the very end are never emitted (decode() would
    give U+FFFD);
  * token ids the tokenizer does not know (a model vocab padded past the tokenizer) decode to "".
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from octavo.outputs import Logprob
from octavo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_INVALID_PREFIX_ERR = "Invalid prefix encountered"
# Prompt tokens used to prime the stream: at least 4, more until the suffix decodes cleanly.
_MIN_PRIME, _MAX_PRIME = 4, 24


def backend_tokenizer(tokenizer) -> Tokenizer:
    """The tokenizers.Tokenizer behind a transformers fast tokenizer (or the Tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no tokenizers backend; octavo needs a "
                        "fast (tokenizers-based) tokenizer.")
    return backend


def _prompt_suffix(backend: Tokenizer, prompt_token_ids: Sequence[int]) -> list[int]:
    """The shortest prompt suffix of >= 4 tokens that does not start inside a UTF-8 character."""
    ids = list(prompt_token_ids)
    if len(ids) <= _MIN_PRIME:
        return ids
    for n in range(_MIN_PRIME, min(len(ids), _MAX_PRIME) + 1):
        if "\ufffd" not in backend.decode(ids[-n:], skip_special_tokens=False):
            return ids[-n:]
    return ids[-_MIN_PRIME:]


class IncrementalDetokenizer:
    """Turns one request's output tokens into text as they arrive, and checks stop strings.

    update(new_token_ids) -> the stop string that matched, or None. After a match output_text
    is cut at the stop string (kept when include_stop_str_in_output) and the request is done.
    With detokenize=False, only token ids are tracked and output_text stays "".
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.params = params
        self.output_text = ""
        self.token_ids: list[int] = []
        self.stop = list(params.stop) if params.detokenize else []
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Chars held back while streaming so a partly generated stop string is never shown.
        self._stop_buffer = (self._max_stop_len - 1
                             if self.stop and not params.include_stop_str_in_output else 0)
        self._sent_offset = 0
        self._backend = backend_tokenizer(tokenizer) if params.detokenize else None
        self._prime = _prompt_suffix(self._backend, prompt_token_ids) if params.detokenize else []
        self._stream = self._new_stream(self._prime)

    def _new_stream(self, prime: list[int]) -> DecodeStream | None:
        if not self.params.detokenize:
            return None
        return DecodeStream(ids=prime or None, skip_special_tokens=self.params.skip_special_tokens)

    def _step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception as e:  # noqa: BLE001 - only the known DecodeStream failure is handled
            if not str(e).startswith(_INVALID_PREFIX_ERR):
                raise
            # Some tokenizers decode non-monotonically (invalid UTF-8 in the prefix breaks the
            # stream's state, vLLM issue 17448); restart the stream from this token.
            logger.warning("DecodeStream reset after: %s", e)
            self._stream = self._new_stream([])
            return self._stream.step(self._backend, token_id) or ""

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Append tokens; return the matched stop string (tokens after it are ignored)."""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            if self._stream is None:
                continue
            new_text = self._step(token_id)
            self.output_text += new_text
            if self.stop and new_text:
                match = check_stop_strings(self.output_text, len(new_text), self.stop,
                                           self.params.include_stop_str_in_output)
                if match is not None:
                    stop_str, truncate_to = match
                    self.output_text = self.output_text[:truncate_to]
                    return stop_str
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report: all of it (delta=False) or what is new since the last call,
        holding back the last max_stop_len - 1 chars until finished."""
        hold = 0 if finished else self._stop_buffer
        end = max(0, len(self.output_text) - hold)
        if not delta:
            return self.output_text[:end]
        start = self._sent_offset
        if end <= start:
            return ""
        self._sent_offset = end
        return self.output_text[start:end]


def check_stop_strings(output_text: str, new_char_count: int, stop: Sequence[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """Find a stop string that ends inside the last new_char_count chars of output_text.

    Only the tail that can hold a new match is searched (the new chars plus the longest stop
    string minus one before them), which also catches stop strings spanning two tokens.
    Returns (stop string, length to truncate the text to), the earliest match winning, or None.
    """
    if not new_char_count:
        return None
    best: tuple[int, str] | None = None
    for s in stop:
        start = max(0, len(output_text) - new_char_count - len(s) + 1)
        idx = output_text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    if best is None:
        return None
    idx, s = best
    return s, idx + len(s) if include_in_output else idx


def decode_token(tokenizer, token_id: int) -> str:
    """A single token's text, as shown in Logprob.decoded_token (special tokens included)."""
    return backend_tokenizer(tokenizer).decode([token_id], skip_special_tokens=False)


def fill_decoded_tokens(tokenizer, logprobs: Iterable[dict[int, Logprob] | None]) -> None:
    """Set decoded_token on every Logprob of a list of per-position dicts (None entries skipped),
    with one batched decode."""
    entries = [lp for pos in logprobs if pos for lp in pos.items()]
    if not entries:
        return
    texts = backend_tokenizer(tokenizer).decode_batch([[tid] for tid, _ in entries],
                                                      skip_special_tokens=False)
    for (_, lp), text in zip(entries, texts):
        lp.decoded_token = text
