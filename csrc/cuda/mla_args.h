// Tensor checks and launcher arguments of the MLA attention kernel, shared by the CUDA wrapper
// and the emulator's CPU wrapper: `dev` is where every tensor must live.
#pragma once

#include "cuda/mla_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::MlaAttentionArgs mla_paged_attention(
    at::Tensor& out,                     // [T, H, L]
    const at::Tensor& q,                 // [T, H, L+R]
    const at::Tensor& kv_cache,          // [num_blocks, block_size, L+R]
    const at::Tensor& query_start_loc,   // [S+1] int32
    const at::Tensor& seq_lens,          // [S] int32
    const at::Tensor& block_table,       // [S, max_blocks] int32
    double scale, int64_t kv_lora_rank, at::DeviceType dev) {
  const char* op = "mla_paged_attention";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &q, &kv_cache, &query_start_loc, &seq_lens, &block_table}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == q.device(), op, ": all tensors must be on ", q.device());
  }
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 3 && kv_cache.size(2) == q.size(2), op,
              ": q must be [T, H, L+R] and kv_cache [num_blocks, block_size, L+R], got ", q.sizes(),
              " and ", kv_cache.sizes());
  const int64_t latent = q.size(2);
  TORCH_CHECK(kv_lora_rank > 0 && kv_lora_rank <= latent, op, ": kv_lora_rank ", kv_lora_rank,
              " must be in (0, ", latent, "]");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == q.size(0) && out.size(1) == q.size(1) &&
                  out.size(2) == kv_lora_rank, op, ": out must be [T, H, ", kv_lora_rank, "], got ",
              out.sizes());
  const cuda::DType dtype = to_dtype(q, op);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && kv_cache.scalar_type() == q.scalar_type(), op,
              ": q, out and kv_cache must have one dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && kv_cache.stride(2) == 1, op,
              ": q, out and kv_cache must have a unit last stride");
  for (const at::Tensor* t : List{&query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": query_start_loc, seq_lens and block_table must be int32");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous() && query_start_loc.dim() == 1 &&
                  query_start_loc.is_contiguous() && query_start_loc.size(0) == num_seqs + 1, op,
              ": seq_lens must be contiguous [S] and query_start_loc contiguous [S+1]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && block_table.stride(1) == 1,
              op, ": block_table must be [S, max_blocks] with a unit last stride");
  TORCH_CHECK(cuda::mla_smem_bytes(latent, kv_lora_rank) <= 48 * 1024, op, ": L+R=", latent,
              " with L=", kv_lora_rank, " needs more than 48 KiB of shared memory per block");
  cuda::MlaAttentionArgs a{};
  a.out = out.data_ptr();
  a.q = q.data_ptr();
  a.kv_cache = kv_cache.data_ptr();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.block_table = block_table.data_ptr<int32_t>();
  a.q_stride_token = q.stride(0);
  a.q_stride_head = q.stride(1);
  a.o_stride_token = out.stride(0);
  a.o_stride_head = out.stride(1);
  a.c_stride_block = kv_cache.stride(0);
  a.c_stride_token = kv_cache.stride(1);
  a.bt_stride = block_table.stride(0);
  a.num_tokens = static_cast<int>(q.size(0));
  a.num_seqs = static_cast<int>(num_seqs);
  a.num_heads = static_cast<int>(q.size(1));
  a.latent_size = static_cast<int>(latent);
  a.kv_lora_rank = static_cast<int>(kv_lora_rank);
  a.block_size = static_cast<int>(kv_cache.size(1));
  a.scale = static_cast<float>(scale);
  a.dtype = dtype;
  return a;
}

}  // namespace octavo::cuda_args
