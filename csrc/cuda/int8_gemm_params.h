// Host-side arguments and launcher declaration of the INT8 W8A8 GEMM (cuda/int8_gemm.cu): plain
// C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct Int8GemmArgs {
  void* out;              // [M, N], row stride out_stride, dtype `dtype`
  const void* x;          // [M, K], row stride x_stride, dtype `dtype`
  int8_t* xq;             // [M, kq] workspace: x quantized per token, zero past K
  float* xscale;          // [M] workspace: activation scales
  int32_t* azp;           // [M] workspace: activation zero points
  const int8_t* qw;       // [P, K2, 16, 2] ops_native.pack_int8_panels codes, P = ceil(N/16)
  const float* wscale;    // [N] per-channel weight scales
  const int32_t* colsum;  // [N] sum_k wq[n, k]
  const void* bias;       // [N] of `dtype`, or null
  const float* in_scale;  // [1] static activation scale (on the device), or null: dynamic
  const int32_t* in_zp;   // [1] static activation zero point, or null
  int64_t out_stride, x_stride;
  int64_t m, n, k, k2, kq, panels;
  bool asymmetric;        // dynamic asymmetric activations (compressed-tensors)
  DType dtype;            // fp32, bf16 or fp16 (x and out)
};

constexpr int kInt8RowAlign = 16;   // kq: K rounded up to this (16-byte rows for cp.async)

bool launch_int8_gemm(const Int8GemmArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
