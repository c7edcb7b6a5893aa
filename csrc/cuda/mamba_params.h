// Host-side arguments and launcher declarations of the CUDA Mamba-1 kernels (cuda/mamba.cu):
// plain C++, shared by the Tensor-level wrappers and the launchers (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

constexpr int kMambaMaxConvWidth = 16;
constexpr int kMambaMaxDstate = 256;

// Sequence b owns rows [seq_start[b], seq_start[b+1]) (row b when seq_start is null: one token
// per sequence) and state slot state_indices[b] (< 0: padding, output rows zero).
struct MambaBatch {
  const int32_t* seq_start;       // [B+1] or null
  const int32_t* state_indices;   // [B]
  const bool* has_initial_state;  // [B] or null (all true)
  int64_t num_seqs, num_tokens;
};

struct CausalConvArgs {
  void* out;                 // [T, D], row stride out_stride
  const void* x;             // [T, D], row stride x_stride
  const float* weight;       // [D, W] contiguous
  const float* bias;         // [D] or null
  void* conv_states;         // [S, D, W-1] (strides), x's dtype
  int64_t out_stride, x_stride, cs_stride_slot, cs_stride_d, cs_stride_w;
  int64_t dim;
  int width;
  bool silu;
  MambaBatch batch;
  DType dtype;
};

struct SelectiveScanArgs {
  void* out;                 // [T, D], row stride out_stride
  const void* u;             // [T, D]
  const void* delta;         // [T, D]
  const void* z;             // [T, D] or null
  const void* B;             // [T, N]
  const void* C;             // [T, N]
  const float* A;            // [D, N] contiguous
  const float* D_skip;       // [D] or null
  const float* delta_bias;   // [D] or null
  void* ssm_states;          // [S, D, N] (strides), state_dtype
  int64_t out_stride, u_stride, delta_stride, z_stride, b_stride, c_stride;
  int64_t ss_stride_slot, ss_stride_d, ss_stride_n;
  int64_t dim;
  int dstate;
  bool delta_softplus;
  MambaBatch batch;
  DType dtype, state_dtype;
};

// Both return false for an unsupported dtype. Grids depend on shapes only (graph-capturable).
bool launch_causal_conv1d(const CausalConvArgs& a, cudaStream_t stream);
bool launch_selective_scan(const SelectiveScanArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
