// MLA attention over the paged latent cache on CPU (launcher only, no kernel of its own): MLA is
// multi-query attention with one head of size L+R whose values are the first L columns of the
// keys, so the paged-attention kernel reads the one latent cache as both K and V (every query
// head of a row shares each latent row it loads) and the first L output columns are kept.
#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "ops.h"

namespace octavo {

void mla_paged_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             const at::Tensor& block_table, double scale, int64_t kv_lora_rank) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 3 && kv_cache.size(2) == q.size(2),
              "mla_paged_attention: q must be [T, H, L+R] and kv_cache [num_blocks, block_size, "
              "L+R], got ", q.sizes(), " and ", kv_cache.sizes());
  TORCH_CHECK(kv_lora_rank > 0 && kv_lora_rank <= q.size(2), "mla_paged_attention: kv_lora_rank ",
              kv_lora_rank, " must be in (0, ", q.size(2), "]");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == q.size(0) && out.size(1) == q.size(1) &&
                  out.size(2) == kv_lora_rank && out.scalar_type() == q.scalar_type(),
              "mla_paged_attention: out must be [T, H, ", kv_lora_rank, "] of q's dtype, got ",
              out.sizes(), " ", out.scalar_type());
  const at::Tensor cache = kv_cache.unsqueeze(2);  // [num_blocks, block_size, 1, L+R]
  at::Tensor full = at::empty_like(q);             // [T, H, L+R]
  paged_attention_cpu(full, q, cache, cache, query_start_loc, seq_lens, block_table, scale, 0, 0.0,
                      std::nullopt, 1.0, 1.0);
  out.copy_(full.narrow(2, 0, kv_lora_rank));
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
