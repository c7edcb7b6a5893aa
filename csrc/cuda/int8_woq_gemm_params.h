// Host-side arguments and launcher declaration of the weight-only INT8 GEMM
// (cuda/int8_woq_gemm.cu): plain C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct Int8WoqGemmArgs {
  void* out;              // [M, N], row stride out_stride, dtype `dtype`
  const void* x;          // [M, K], row stride x_stride, dtype `dtype`
  const int8_t* qw;       // [P, K, 16] ops_native.pack_int8_woq_panels codes, P = ceil(N/16)
  const float* so;        // [P, G, 2, 16] scales, then offsets, of each panel's 16 outputs
  const void* bias;       // [N] of `dtype`, or null
  int64_t out_stride, x_stride;
  int64_t m, n, k, panels, groups, group_size;
  bool x_vec16;           // x and its row stride are 16-byte aligned (cp.async of 16-bit rows)
  DType dtype;            // fp32, bf16 or fp16 (x, out and bias)
};

// Groups along K must be whole mma K steps (or one group over all of K).
constexpr int kInt8WoqStepK = 16;

bool launch_int8_woq_gemm(const Int8WoqGemmArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
