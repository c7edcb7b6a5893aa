// Gated activation kernels: out = act(x[:, :D]) * x[:, D:], fp32 math (no torch headers).
#pragma once

#include "cuda/launch.cuh"

namespace octavo::cuda {

template <int KIND>
__device__ __forceinline__ float act(float x) {
  if constexpr (KIND == 0) {
    return x / (1.f + __expf(-x));
  } else if constexpr (KIND == 1) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else {
    const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
  }
}

// grid: (T, ceil(D / blockDim.x))
template <typename T, int KIND>
__global__ void act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x,
                                   int64_t out_stride, int64_t x_stride, int64_t d) {
  const int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  const T* row = x + blockIdx.x * x_stride;
  out[blockIdx.x * out_stride + i] = from_float<T>(act<KIND>(to_float(row[i])) * to_float(row[d + i]));
}

}  // namespace octavo::cuda
