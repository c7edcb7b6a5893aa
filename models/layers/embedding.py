"""Vocabulary-parallel token embedding and LM head (rank r holds a contiguous vocab range)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo.models.layers import cpu_gemm
from octavo.models.layers.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # Rows per rank, rounded up; the last rank's tail rows are zero padding.
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding of shape {tuple(loaded_weight.shape)} does not match "
                             f"({self.num_embeddings}, {self.embedding_dim})")
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start:self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, embedding_dim]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return tp_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings}, dim={self.embedding_dim}, "
                f"rows {self.vocab_start}:{self.vocab_end}")


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; `tie_to(embedding)` shares the embedding's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None):
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition,
                                                 dtype=self.weight.dtype), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def _bias_loader(self, param, loaded_weight, shard_id=None):
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start:self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids):
        raise RuntimeError("ParallelLMHead is applied by compute_logits, not called directly")

    def process_weights_after_loading(self) -> None:
        if getattr(self, "woq_weight", None) is not None:   # a GGUF's quantized head (loader)
            return
        if getattr(self, "packed_weight", None) is not None:   # packed already
            return
        self.packed_weight = cpu_gemm.pack(self.weight, in_place=not getattr(self, "tied", False))
        # a tied embedding still looks rows up in the plain weight; an untied head's packed
        # copy replaces it (one copy in memory, as for the other linear layers)
        if self.packed_weight is not None and not getattr(self, "tied", False):
            self.weight.data = self.weight.data.new_empty(0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, H] -> [N, vocab] float32 (matmul in the model dtype, like HF)
        woq = getattr(self, "woq_weight", None)
        if woq is not None:
            from octavo import ops
            return ops.int8_woq_gemm_prepared(hidden, woq).float()
        logits = cpu_gemm.linear_or_packed(hidden, self.weight,
                                           getattr(self, "packed_weight", None), self.bias)
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings].float()
