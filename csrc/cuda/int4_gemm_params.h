// Host-side arguments and launcher declaration of the INT4 weight-only GEMM (cuda/int4_gemm.cu):
// plain C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct Int4GemmArgs {
  void* out;              // [M, N], row stride out_stride, dtype `dtype`
  const void* x;          // [M, K], row stride x_stride, dtype `dtype` (K in the packed order)
  const uint8_t* qw;      // [P, K2, 32] ops_native.pack_int4_panels codes, P = ceil(N/32)
  const float* so;        // [P, G, 2, 32] scales, then offsets, of each panel's 32 outputs
  const void* bias;       // [N] of `dtype`, or null
  int64_t out_stride, x_stride;
  int64_t m, n, k, k2, panels, groups, group_size;
  bool x_vec16;           // x and its row stride are 16-byte aligned (cp.async of x rows)
  DType dtype;            // bf16 or fp16 (tensor cores)
};

// Groups along K must be whole mma K steps (or one group over all of K).
constexpr int kInt4StepK = 16;

bool launch_int4_gemm(const Int4GemmArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
