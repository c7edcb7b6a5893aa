"""Position encodings that are not rotary: learned absolute embeddings (GPT-2, OPT, StarCoder)
and ALiBi slopes (BLOOM), which the paged attention kernel adds as slope[h] * (key - query)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from octavo.models.layers.parallel_state import get_tp_rank, get_tp_size


class LearnedPositionEmbedding(nn.Module):
    """A [num_positions + offset, dim] table indexed by position + offset (replicated on every
    rank: it is small). OPT's table has 2 leading rows that positions never use (offset 2)."""

    def __init__(self, num_positions: int, dim: int, offset: int = 0):
        super().__init__()
        self.num_positions, self.offset = num_positions, offset
        self.weight = nn.Parameter(torch.empty(num_positions + offset, dim), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: [T] int64 -> [T, dim]
        return F.embedding(positions + self.offset, self.weight)

    def extra_repr(self) -> str:
        return f"positions={self.num_positions}, dim={self.weight.shape[1]}, offset={self.offset}"


def alibi_slopes(total_num_heads: int) -> torch.Tensor:
    """[total_num_heads] float32 slopes of Press et al.: a geometric sequence for the largest
    power of two <= heads, then every other slope of the next power of two for the rest."""
    closest = 2 ** math.floor(math.log2(total_num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != total_num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, total_num_heads - closest)
        slopes += [extra_base ** p for p in range(1, 1 + 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_for_rank(total_num_heads: int) -> torch.Tensor:
    """The slopes of this tensor-parallel rank's heads (heads are split contiguously)."""
    per_rank = total_num_heads // get_tp_size()
    start = get_tp_rank() * per_rank
    return alibi_slopes(total_num_heads)[start:start + per_rank]
