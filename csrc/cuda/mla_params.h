// Host-side arguments and launcher declaration of the CUDA MLA attention kernel (cuda/mla.cu):
// plain C++, shared by the Tensor-level wrappers and the launcher (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

// Heads per thread block (one warp each) of the MLA kernel.
constexpr int kMlaHeadsPerBlock = 4;
// Keys staged in shared memory per step.
constexpr int kMlaKeyTile = 8;

struct MlaAttentionArgs {
  void* out;                       // [T, H, L], strides o_stride_token, o_stride_head
  const void* q;                   // [T, H, L+R], strides q_stride_token, q_stride_head
  const void* kv_cache;            // [num_blocks, block_size, L+R]
  const int32_t* query_start_loc;  // [S+1]
  const int32_t* seq_lens;         // [S]
  const int32_t* block_table;      // [S, max_blocks], row stride bt_stride
  int64_t q_stride_token, q_stride_head, o_stride_token, o_stride_head;
  int64_t c_stride_block, c_stride_token;
  int64_t bt_stride;
  int num_tokens, num_seqs, num_heads, latent_size, kv_lora_rank, block_size;
  float scale;
  DType dtype;
};

// Dynamic shared memory of one block: the key tile, the block's queries and accumulators (fp32).
inline int64_t mla_smem_bytes(int latent_size, int kv_lora_rank) {
  return int64_t(4) * ((kMlaKeyTile + kMlaHeadsPerBlock) * latent_size +
                       kMlaHeadsPerBlock * kv_lora_rank);
}

// Returns false for an unsupported dtype.
bool launch_mla_paged_attention(const MlaAttentionArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
