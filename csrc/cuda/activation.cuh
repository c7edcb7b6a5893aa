// Gated activation kernels: out = act(x[:, :D]) * x[:, D:], fp32 math (no torch headers).
#pragma once

#include "cuda/vec.cuh"

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

// grid: (T, ceil(D / N / blockDim.x)); each thread N consecutive outputs (D % N == 0)
template <typename T, int KIND, int N>
__global__ void act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x,
                                   int64_t out_stride, int64_t x_stride, int64_t d) {
  const int64_t i = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * N;
  if (i >= d) return;
  const T* row = x + blockIdx.x * x_stride;
  float g[N], u[N];
  load_n<T, N>(row + i, g);
  load_n<T, N>(row + d + i, u);
  OCTAVO_UNROLL
  for (int e = 0; e < N; ++e) g[e] = act<KIND>(g[e]) * u[e];
  store_n<T, N>(out + blockIdx.x * out_stride + i, g);
}

}  // namespace octavo::cuda
