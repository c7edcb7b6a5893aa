"""Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) over a paged latent cache.

Per token the cache keeps one vector shared by all heads: the normalised kv latent (kv_lora_rank
values) and the rotated key (qk_rope_head_dim), 576 values for DeepSeek-V3 instead of
2 x heads x head_dim. Attention runs in the latent space with the absorbed projections, as in
vLLM's MLA decode: kv_b_proj = [W_UK; W_UV] per head, so q_nope . (W_UK c) = (W_UK^T q_nope) . c
and sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j). A step of whole prompts of at least
`decompress_min_tokens` tokens decompresses instead (K, V per head from kv_b_proj, ordinary causal
attention), which needs fewer FLOPs once prompts are long; the latents are cached either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.cache_spec import CacheLayer, PagedLatentSpec
from octavo.models.layers.custom_op import CustomOp
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from octavo.models.layers.parallel_state import get_tp_size
from octavo.models.layers.rotary import get_rope, rope_parameters


class MLAAttention(CustomOp, CacheLayer):
    """Writes this step's latents into the paged latent cache ([num_blocks, block_size, L+R])
    and attends q [T, H, L+R] over it -> [T, H, L] (decode, chunked prefill, prefix hits)."""

    def __init__(self, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.rope_dim = num_heads, kv_lora_rank, rope_dim
        self.scale = float(scale)
        self.kv_cache: torch.Tensor | None = None   # [num_blocks, block_size, L+R], from the runner

    def cache_spec(self) -> PagedLatentSpec:
        return PagedLatentSpec(self.kv_lora_rank + self.rope_dim)

    def bind_cache(self, caches: tuple[torch.Tensor, ...] | None) -> None:
        self.kv_cache = caches[0] if caches is not None else None

    def write(self, kv_c: torch.Tensor, k_pe: torch.Tensor, md: AttentionMetadata) -> None:
        """Only cache this step's latents (a prefill that attends over them decompressed)."""
        if self.kv_cache is not None and self.kv_cache.numel() > 0:
            impl = ops_native if self.use_native or CustomOp.use_native else ops
            impl.concat_and_cache_mla(kv_c, k_pe, self.kv_cache, md.slot_mapping)

    def _forward(self, impl, q, kv_c, k_pe, md: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, L+R]; kv_c: [T, L]; k_pe: [T, R] -> [T, H, L]
        if self.kv_cache is None or self.kv_cache.numel() == 0:  # profiling: whole prompts only
            cache, table = _one_block_per_sequence(kv_c, k_pe, md)
            impl.concat_and_cache_mla(kv_c, k_pe, cache, _slots_of(md, cache.shape[1]))
            return impl.mla_paged_attention(q, cache, md.query_start_loc, md.seq_lens, table,
                                            self.scale, self.kv_lora_rank)
        impl.concat_and_cache_mla(kv_c, k_pe, self.kv_cache, md.slot_mapping)
        return impl.mla_paged_attention(q, self.kv_cache, md.query_start_loc, md.seq_lens,
                                        md.block_table, self.scale, self.kv_lora_rank)

    def forward_ops(self, q, kv_c, k_pe, attn_metadata):
        return self._forward(ops, q, kv_c, k_pe, attn_metadata)

    def forward_native(self, q, kv_c, k_pe, attn_metadata):
        return self._forward(ops_native, q, kv_c, k_pe, attn_metadata)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"rope_dim={self.rope_dim}, scale={self.scale:.4g}")


def _one_block_per_sequence(kv_c, k_pe, md: AttentionMetadata):
    starts = md.query_start_loc.tolist()
    lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if lens != md.seq_lens.tolist():
        raise RuntimeError("MLA attention has no latent cache: only whole prompts can run before "
                           "the runner binds one")
    block = max(lens + [1])
    cache = kv_c.new_zeros(len(lens), block, kv_c.shape[-1] + k_pe.shape[-1])
    table = torch.arange(len(lens), dtype=torch.int32, device=kv_c.device).view(-1, 1)
    return cache, table


def _slots_of(md: AttentionMetadata, block: int) -> torch.Tensor:
    starts = md.query_start_loc.tolist()
    slots = torch.full((md.slot_mapping.shape[0],), -1, dtype=torch.int64,
                       device=md.slot_mapping.device)
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        slots[a:b] = torch.arange(b - a, device=slots.device) + s * block
    return slots


class MultiHeadLatentAttention(nn.Module):
    """The MLA block with the checkpoint's module names: low-rank q (q_a_proj -> q_a_layernorm ->
    q_b_proj) or a plain q_proj, kv_a_proj_with_mqa -> (latent, k_pe), kv_a_layernorm on the
    latent, kv_b_proj (per head [W_UK; W_UV], used only through its absorbed halves), o_proj.
    `rope_neox`: neox halves (MiniCPM3, DeepSeek-V3 with rope_interleave off) or GPT-J pairs
    (DeepSeek-V2, V3's interleaved rope). `scale`: the softmax scale (yarn's mscale included)."""

    # Per head and key, latent attention costs 2L+R multiply-adds, decompressed attention
    # qk_head_dim + v_head_dim plus decompressing each key once. Measured on the project's CPU
    # (DeepSeek-V2-Lite attention, fp32, one thread, one prompt): 157 -> 138 ms at 128 tokens,
    # 1025 -> 652 ms at 512.
    decompress_min_tokens = 128

    def __init__(self, config, rope_neox: bool, scale: float | None = None):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = getattr(config, "v_head_dim", None) or hidden // total_heads
        self.kv_lora = config.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        self.num_heads = total_heads // get_tp_size()
        q_lora, eps = getattr(config, "q_lora_rank", None), config.rms_norm_eps
        bias = bool(getattr(config, "attention_bias", False))
        if q_lora:
            self.q_a_proj = ReplicatedLinear(hidden, q_lora, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora, eps=eps)
            self.q_b_proj = ColumnParallelLinear(q_lora, total_heads * qk_dim)
        else:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * qk_dim)
        self.q_lora = q_lora
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, eps=eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora, total_heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden, bias=bias)
        base, scaling = rope_parameters(config)
        self.rotary_emb = get_rope(self.rope_dim, self.rope_dim, config.max_position_embeddings,
                                   base, is_neox_style=rope_neox, rope_scaling=scaling)
        self.attn = MLAAttention(self.num_heads, self.kv_lora, self.rope_dim,
                                 qk_dim ** -0.5 if scale is None else scale)
        # absorbed kv_b_proj halves, taken before kv_b_proj repacks its weight for the CPU GEMM
        self.w_uk: torch.Tensor | None = None     # [H, nope, L]
        self.w_uv_t: torch.Tensor | None = None   # [H, L, v]

    def process_weights_after_loading(self) -> None:
        # runs before kv_b_proj's own (modules() visits a parent first), while weight is plain
        w = self.kv_b_proj.weight
        if w.numel() == 0:
            raise RuntimeError("kv_b_proj was repacked before MLA took its absorbed halves")
        dequantized = getattr(self.kv_b_proj.quant_method, "dequantized_weight", None)
        if dequantized is not None:
            # an fp8 kv_b_proj is dequantized once: the absorbed halves are bmm operands every
            # step, kept in the model's dtype (as vLLM does); kv_b_proj itself stays fp8 for
            # decompressed prefills
            w = dequantized(self.kv_b_proj).to(self.kv_a_layernorm.weight.dtype)
        elif not w.is_floating_point() or w.element_size() == 1:
            raise ValueError(f"MLA cannot absorb a kv_b_proj quantized by "
                             f"{type(self.kv_b_proj.quant_method).__name__}: keep it unquantized")
        w = w.view(self.num_heads, self.nope + self.v_dim, self.kv_lora)
        self.w_uk = w[:, :self.nope].contiguous()
        self.w_uv_t = w[:, self.nope:].transpose(1, 2).contiguous()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        if self.w_uk is None:   # a model used without the runner's after-loading step
            self.process_weights_after_loading()
        T, H = hidden.shape[0], self.num_heads
        q = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))) if self.q_lora
             else self.q_proj(hidden)).view(T, H, self.nope + self.rope_dim)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora, self.rope_dim], -1)
        kv_c = self.kv_a_layernorm(latent.contiguous())                # [T, L]
        q_pe = q[..., self.nope:].reshape(T, H * self.rope_dim)        # copies: rotated in place
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.contiguous())
        if self._decompress(attn_metadata):
            self.attn.write(kv_c, k_pe, attn_metadata)
            out = self._prefill_decompressed(q[..., :self.nope], q_pe.view(T, H, self.rope_dim),
                                             kv_c, k_pe, attn_metadata)
            return self.o_proj(out.reshape(T, H * self.v_dim))
        q_lat = torch.bmm(q[..., :self.nope].transpose(0, 1), self.w_uk)     # [H, T, L]
        q_full = torch.cat([q_lat.transpose(0, 1), q_pe.view(T, H, self.rope_dim)], dim=-1)
        out_lat = self.attn(q_full, kv_c, k_pe, attn_metadata)               # [T, H, L]
        out = torch.bmm(out_lat.transpose(0, 1), self.w_uv_t)                # [H, T, v]
        return self.o_proj(out.transpose(0, 1).reshape(T, H * self.v_dim))

    def _decompress(self, md: AttentionMetadata) -> bool:
        """Whole prompts only (nothing cached before this step), the longest long enough."""
        if md.max_query_len < self.decompress_min_tokens:
            return False
        starts = md.query_start_loc.tolist()
        return [b - a for a, b in zip(starts[:-1], starts[1:])] == md.seq_lens.tolist()

    def _prefill_decompressed(self, q_nope, q_pe, kv_c, k_pe, md: AttentionMetadata):
        # [T, H, nope], [T, H, R], [T, L], [T, R] -> [T, H, v]: per head K = [W_UK c | k_pe],
        # V = W_UV c, causal attention within each prompt
        T, H = q_nope.shape[:2]
        kv = self.kv_b_proj(kv_c).view(T, H, self.nope + self.v_dim)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)               # [H, T, nope+R]
        k = torch.cat([kv[..., :self.nope],
                       k_pe.view(T, 1, self.rope_dim).expand(T, H, self.rope_dim)], -1)
        k, v = k.transpose(0, 1), kv[..., self.nope:].transpose(0, 1)       # [H, T, .]
        out = q_nope.new_zeros(H, T, self.v_dim)
        starts = md.query_start_loc.tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            out[:, a:b] = F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b],
                                                         is_causal=True, scale=self.attn.scale)
        return out.transpose(0, 1)
