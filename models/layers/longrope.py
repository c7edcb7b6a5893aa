"""LongRoPE (Phi-3 "longrope", formerly "su"): per-dimension frequency divisors, one set for
short contexts and one for long, and an attention factor on cos/sin.

transformers picks the set from a sequence's length: long once it is longer than
original_max_position_embeddings. octavo does the same per sequence: the cos/sin cache holds
the short table (original_max rows) followed by the long table (max_position rows), and
`rope_positions` moves the tokens of every sequence longer than original_max into the long
table. So a prompt that starts longer than original_max, and a sequence that stays within it,
match transformers exactly. A sequence that grows past original_max while decoding does not:
transformers' Phi3ForCausalLM then drops its KV cache and recomputes the whole sequence with
the long set, while octavo keeps the cached (short-set) keys and values and rotates only the
new tokens with the long set (what transformers' rotary module alone does); the same holds for
a prompt prefilled in chunks across that length. Matching that needs the scheduler to recompute
such a sequence when it passes original_max (recompute preemption), and prefix-cache block
hashes that include the set, since a block's keys depend on it.
vLLM picks one set for the engine's lifetime instead: long whenever max_model_len >
original_max (older versions: long for the whole batch once any position in it reached
original_max), so there short sequences use the long factors too.
"""
from __future__ import annotations

import math

import torch

from octavo.models.layers.rotary import RotaryEmbedding


class LongRoPEScaledRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool, original_max_position: int, short_factor: list[float],
                 long_factor: list[float], factor: float | None = None,
                 attention_factor: float | None = None):
        for name, factors in (("short_factor", short_factor), ("long_factor", long_factor)):
            if len(factors) != rotary_dim // 2:
                raise ValueError(f"longrope {name} has {len(factors)} entries; it needs "
                                 f"rotary_dim / 2 = {rotary_dim // 2}")
        self.original_max_position = original_max_position
        self.short_factor, self.long_factor = list(short_factor), list(long_factor)
        if factor is None:  # Phi-3 configs give the ratio through max_position_embeddings
            factor = max_position / original_max_position
        if attention_factor is None:
            attention_factor = (1.0 if factor <= 1.0 else
                                math.sqrt(1 + math.log(factor) / math.log(original_max_position)))
        self.attention_factor = float(attention_factor)
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _inv_freq(self, factors: list[float]) -> torch.Tensor:
        return self._compute_inv_freq(self.base) / torch.tensor(factors, dtype=torch.float32)

    def _table(self, inv_freq: torch.Tensor, length: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_factor

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        # [original_max + max_position, rotary_dim]: short rows, then long rows
        short, long = self._inv_freq(self.short_factor), self._inv_freq(self.long_factor)
        return torch.cat((self._table(short, self.original_max_position),
                          self._table(long, self.max_position)))

    def rope_positions(self, positions: torch.Tensor, query_start_loc: torch.Tensor,
                       seq_lens: torch.Tensor) -> torch.Tensor:
        """Rows of the cache for each token: its position, moved into the long table when its
        sequence (seq_lens, including this step's tokens) is longer than original_max."""
        # positions [T] int64; query_start_loc [S+1]; seq_lens [S] -> [T] int64
        token = torch.arange(positions.shape[0], device=positions.device)
        seq = torch.searchsorted(query_start_loc[1:].to(torch.int64), token, right=True)
        seq = seq.clamp_(max=seq_lens.shape[0] - 1)  # padding rows past the last sequence
        is_long = seq_lens.to(positions.device)[seq] > self.original_max_position
        return positions + is_long.to(positions.dtype) * self.original_max_position

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", original_max_position={self.original_max_position}, "
                f"attention_factor={self.attention_factor:.4g}")
