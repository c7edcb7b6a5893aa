// Host-side arguments and launcher declaration of fused MoE over 4-bit experts (cuda/moe_int4.cu):
// plain C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

// One stack of 4-bit experts in the INT4 GEMM's layout (int4_gemm_params.h), a leading E dim.
struct MoeInt4Stack {
  const uint8_t* qw;      // [E, panels, k2, 32] pack_int4_panels codes of every expert
  const float* so;        // [E, panels, groups, 2, 32] scales, then offsets
  int64_t panels, k, k2, groups, group_size;
};

struct MoeInt4Args {
  void* out;                   // [T, H], row stride out_stride, dtype `dtype`
  const void* hidden;          // [T, H], row stride hidden_stride
  // w13: gate panels 0..Pi-1, then the matching up panels Pi..2Pi-1 (Pi = ceil(I/32)), K = H;
  // w2: ceil(H/32) panels, K = I (ops_native's INT4 MoE section)
  MoeInt4Stack w13, w2;
  const float* topk_weights;   // [T * k]
  const int32_t* topk_ids;     // [T * k]
  // act order: expert e's w13 K column c reads hidden[:, w13_perm[e * H + c]]; null: in order
  const int32_t* w13_perm;     // [E, H] or null
  // workspace from the caller, sized by shapes only
  int32_t* sorted_token_ids;   // [P]
  int32_t* expert_ids;         // [P / kMoeBlockM]
  int32_t* num_tokens_post_pad;  // [1]
  void* inter;                 // [P, I] act(gate) * up of every tile row, hidden's dtype
  float* partial;              // [T * k, H] weighted expert outputs per pair
  int64_t out_stride, hidden_stride;
  int64_t num_tokens, hidden_size, inter_size, padded_len;
  int num_experts, top_k;
  int act;                     // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  bool hidden_vec16;           // hidden and its row stride 16-byte aligned (cp.async of rows)
  DType dtype;                 // bf16 or fp16 (tensor cores)
};

// Up to this many (token, expert) pairs the GEMMs take the decode shape: one panel per block,
// the four warps splitting K, so that a handful of tiles still fill the GPU.
constexpr int64_t kMoeInt4DecodePairs = 64;

bool launch_fused_moe_int4(const MoeInt4Args& a, cudaStream_t stream);

}  // namespace octavo::cuda
