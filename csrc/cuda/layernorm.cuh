// RMSNorm kernels: one block per row, fp32 math (no torch headers). N elements per access: a
// 16-byte vector where the launcher found rows and weight aligned, else 1.
#pragma once

#include "cuda/vec.cuh"

namespace octavo::cuda {

// out[t] = x[t] / rms(x[t]) * w ; x, out: [T, H] with row strides; H % N == 0
template <typename T, int N>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ w, int64_t out_stride, int64_t x_stride,
                                int hidden, float eps) {
  const T* row = x + blockIdx.x * x_stride;
  const int nv = hidden / N;
  float ss = 0.f;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[N];
    load_n<T, N>(row + i * N, f);
    OCTAVO_UNROLL
    for (int e = 0; e < N; ++e) ss += f[e] * f[e];
  }
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
  T* o = out + blockIdx.x * out_stride;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[N], g[N];
    load_n<T, N>(row + i * N, f);
    load_n<T, N>(w + i * N, g);
    OCTAVO_UNROLL
    for (int e = 0; e < N; ++e) f[e] = f[e] * inv * g[e];
    store_n<T, N>(o + i * N, f);
  }
}

// residual <- round(x + residual); x <- rms_norm(residual) * w
template <typename T, int N>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                                          const T* __restrict__ w, int64_t x_stride,
                                          int64_t r_stride, int hidden, float eps) {
  T* xr = x + blockIdx.x * x_stride;
  T* rr = residual + blockIdx.x * r_stride;
  const int nv = hidden / N;
  float ss = 0.f;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[N], r[N];
    load_n<T, N>(xr + i * N, f);
    load_n<T, N>(rr + i * N, r);
    OCTAVO_UNROLL
    for (int e = 0; e < N; ++e) {
      f[e] = to_float(from_float<T>(f[e] + r[e]));  // the sum as the residual stores it
      ss += f[e] * f[e];
    }
    store_n<T, N>(rr + i * N, f);
  }
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    float f[N], g[N];
    load_n<T, N>(rr + i * N, f);
    load_n<T, N>(w + i * N, g);
    OCTAVO_UNROLL
    for (int e = 0; e < N; ++e) f[e] = f[e] * inv * g[e];
    store_n<T, N>(xr + i * N, f);
  }
}

}  // namespace octavo::cuda
