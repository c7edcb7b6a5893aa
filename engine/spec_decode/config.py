"""speculative_config as vLLM takes it (a dict, or its JSON text on the command line), checked once.

{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
proposes by prompt lookup; {"model": DIR, "num_speculative_tokens": k} (method "draft_model",
implied by "model") proposes with a smaller model that shares the target's vocabulary;
{"method": "eagle", "model": DIR, ...} with an EAGLE-1 head that reads the target's hidden states;
{"method": "mtp", ...} (or "deepseek_mtp") with DeepSeek-V3's multi-token-prediction layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "eagle", "mtp")
_NOT_YET = ("eagle3", "medusa", "mlp_speculator")
_ALIASES = {"deepseek_mtp": "mtp"}
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """None, a dict, a JSON string or a SpeculativeConfig -> SpeculativeConfig or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e}): give e.g. "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a dict (or its JSON text), got "
                             f"{type(value).__name__}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; octavo reads "
                             f"{sorted(_KEYS)}")
        method = value.get("method") or ("draft_model" if value.get("model") else None)
        method = _ALIASES.get(method, method)
        if method in _NOT_YET:
            raise ValueError(f"speculative method {method!r} is not supported yet; use "
                             "'ngram' or a draft model ({'model': DIR, ...})")
        if method not in METHODS:
            raise ValueError(f"speculative_config needs a method in {list(METHODS)} or a draft "
                             f"'model', got method={method!r}")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError("speculative_config needs num_speculative_tokens, a positive integer, "
                             f"got {k!r}")
        model = value.get("model")
        if method in ("draft_model", "eagle") and not isinstance(model, str):
            raise ValueError(f"a {method} speculative_config needs 'model': the draft "
                             f"{'head' if method == 'eagle' else 'model'}'s directory")
        if method in ("ngram", "mtp") and model is not None:
            raise ValueError(f"method {method!r} takes no 'model' ("
                             + ("it proposes from the prompt)" if method == "ngram" else
                                "the MTP layers come from the target's checkpoint)"))
        n_max = value.get("prompt_lookup_max", 4 if method == "ngram" else None)
        n_min = value.get("prompt_lookup_min", 1 if method == "ngram" else None)
        if method == "ngram":
            for name, v in (("prompt_lookup_max", n_max), ("prompt_lookup_min", n_min)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{name} must be a positive integer, got {v!r}")
            if n_min > n_max:
                raise ValueError(f"prompt_lookup_min={n_min} is more than prompt_lookup_max="
                                 f"{n_max}")
        return cls(method, k, model, n_max or 4, n_min or 1)
