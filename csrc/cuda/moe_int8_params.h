// Host-side arguments and launcher declaration of fused MoE over weight-only int8 experts
// (cuda/moe_int8.cu): plain C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

// One stack of int8 experts in the weight-only INT8 GEMM's layout (int8_woq_gemm_params.h), a
// leading E dim.
struct MoeInt8Stack {
  const int8_t* qw;       // [E, panels, k, 16] pack_int8_woq_panels codes of every expert
  const float* so;        // [E, panels, groups, 2, 16] scales, then offsets
  int64_t panels, k, groups, group_size;
};

struct MoeInt8Args {
  void* out;                   // [T, H], row stride out_stride, dtype `dtype`
  const void* hidden;          // [T, H], row stride hidden_stride
  // w13: gate panels 0..Pi-1, then the matching up panels Pi..2Pi-1 (Pi = ceil(I/16)), K = H;
  // w2: ceil(H/16) panels, K = I (ops_native's INT8 MoE section)
  MoeInt8Stack w13, w2;
  const float* topk_weights;   // [T * k]
  const int32_t* topk_ids;     // [T * k]
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
  DType dtype;                 // fp32, bf16 or fp16 (hidden, out and the intermediate)
};

// Up to this many (token, expert) pairs the GEMMs take the decode shape: one 32-output unit per
// block, the four warps splitting K, so that a handful of tiles still fill the GPU.
constexpr int64_t kMoeInt8DecodePairs = 64;

bool launch_fused_moe_int8(const MoeInt8Args& a, cudaStream_t stream);

}  // namespace octavo::cuda
