// Host-side parameter structs and launcher declarations for the CUDA kernels. Plain C++ (no
// torch, no CUDA headers beyond the stream type) so the Tensor-level wrappers and the .cu
// launchers share it.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace octavo::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

struct RmsNormArgs {
  void* out;             // [T, H] (rms_norm) ; null for fused_add_rms_norm
  void* x;               // [T, H]
  void* residual;        // [T, H] or null
  const void* weight;    // [H]
  int64_t out_stride, x_stride, residual_stride;
  int64_t num_tokens, hidden;
  float eps;
  DType dtype;
};

struct ActArgs {
  void* out;             // [T, D]
  const void* x;         // [T, 2*D]
  int64_t out_stride, x_stride;
  int64_t num_tokens, d;
  int kind;              // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

// Each returns false for an unsupported dtype; launch errors are left to cudaGetLastError.
bool launch_rms_norm(const RmsNormArgs& a, cudaStream_t stream);
bool launch_fused_add_rms_norm(const RmsNormArgs& a, cudaStream_t stream);
bool launch_act_and_mul(const ActArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
