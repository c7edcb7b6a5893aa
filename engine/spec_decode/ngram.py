"""N-gram (prompt lookup) proposer: the tokens that followed the most recent earlier occurrence
of the sequence's last n tokens, trying n from prompt_lookup_max down to prompt_lookup_min.
Costs no model: it pays off where outputs copy their context (code edits, summaries, RAG)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int,
                 prompt_lookup_min: int = 1) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {num_speculative_tokens}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"prompt_lookup_min={prompt_lookup_min}, "
                             f"prompt_lookup_max={prompt_lookup_max}")
        self.k = num_speculative_tokens
        self.n_max = prompt_lookup_max
        self.n_min = prompt_lookup_min

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Up to k draft tokens for a sequence (prompt + output so far); [] when its last n
        tokens occur nowhere earlier for any n in [n_min, n_max]."""
        ids = np.asarray(token_ids, dtype=np.int64)
        length = len(ids)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            suffix = ids[length - n:]
            # windows[i] = ids[i:i+n] for every start i whose window ends before the suffix
            windows = np.lib.stride_tricks.sliding_window_view(ids[:length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n             # the most recent occurrence
                return ids[start:start + self.k].tolist()
        return []
