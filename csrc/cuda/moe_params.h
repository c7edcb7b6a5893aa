// Host-side argument structs and launcher declarations of the CUDA MoE kernels (cuda/moe.cu):
// plain C++, shared by the Tensor-level wrappers and the launchers (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct TopkRoutingArgs {
  float* topk_weights;        // [T, k]
  int32_t* topk_ids;          // [T, k]
  const void* gating_output;  // [T, E], row stride gating_stride, dtype `dtype`
  const float* bias;          // [E] or null
  int64_t gating_stride, num_tokens;
  int num_experts, top_k, n_group, topk_group;
  bool softmax, renormalize, top2_sum;
  float routed_scaling_factor;
  DType dtype;
};

struct MoeAlignArgs {
  const int32_t* topk_ids;     // [T * k]
  int32_t* sorted_token_ids;   // [P]
  int32_t* expert_ids;         // [P / block_size]
  int32_t* num_tokens_post_pad;  // [1]
  int64_t num_pairs, padded_len;  // T * k, P
  int num_experts, block_size;
};

constexpr int kMoeMaxGroupsHost = 64;  // routing kernel's n_group limit (kMoeMaxGroups)

// fused_moe's two grouped GEMMs run over the moe_align tiles of kMoeBlockM rows.
constexpr int kMoeBlockM = 16;

struct FusedMoeArgs {
  void* out;                   // [T, H], row stride out_stride
  const void* hidden;          // [T, H], row stride hidden_stride
  const void* w13;             // [E, 2I, H] contiguous
  const void* w2;              // [E, H, I] contiguous
  // e4m3 experts (w13 / w2 hold their uint8 codes): fp32 scales per output row and K-block of
  // block_k columns (ops_native.fp8_moe_row_scales); null for bf16 / fp16 weights
  const float* w13_scale;      // [E, 2I, ceil(H / block_k13)]
  const float* w2_scale;       // [E, H, ceil(I / block_k2)]
  int64_t block_k13, block_k2;
  const float* topk_weights;   // [T * k]
  const int32_t* topk_ids;     // [T * k]
  // workspace from the caller, sized by shapes only (moe_workspace_sizes)
  int32_t* sorted_token_ids;   // [P]
  int32_t* expert_ids;         // [P / kMoeBlockM]
  int32_t* num_tokens_post_pad;  // [1]
  void* inter;                 // [P, I] activated intermediate, hidden's dtype
  float* partial;              // [T * k, H] weighted expert outputs per pair
  int64_t out_stride, hidden_stride;
  int64_t num_tokens, hidden_size, inter_size, padded_len;
  int num_experts, top_k;
  int act;                     // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

// P for moe_align (the same formula as ops_native.moe_align_sizes).
inline int64_t moe_padded_len(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  const int64_t busy = num_pairs < num_experts ? num_pairs : num_experts;
  const int64_t p = num_pairs + busy * (block_size - 1);
  return (p + block_size - 1) / block_size * block_size;
}

bool launch_topk_routing(const TopkRoutingArgs& a, cudaStream_t stream);
bool launch_moe_align(const MoeAlignArgs& a, cudaStream_t stream);
bool launch_fused_moe(const FusedMoeArgs& a, cudaStream_t stream);  // bf16 and fp16 only
// the same with e4m3 experts (a.w13_scale set): bf16 / fp16 activations
bool launch_fused_moe_fp8(const FusedMoeArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
