// RMSNorm kernels: one block per row, fp32 math (no torch headers).
#pragma once

#include "cuda/launch.cuh"

namespace octavo::cuda {

// out[t] = x[t] / rms(x[t]) * w ; x, out: [T, H] with row strides
template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ w, int64_t out_stride, int64_t x_stride,
                                int hidden, float eps) {
  const T* row = x + blockIdx.x * x_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(row[i]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
  T* o = out + blockIdx.x * out_stride;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    o[i] = from_float<T>(to_float(row[i]) * inv * to_float(w[i]));
}

// residual <- round(x + residual); x <- rms_norm(residual) * w
template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                                          const T* __restrict__ w, int64_t x_stride,
                                          int64_t r_stride, int hidden, float eps) {
  T* xr = x + blockIdx.x * x_stride;
  T* rr = residual + blockIdx.x * r_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T z = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    rr[i] = z;
    const float v = to_float(z);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    xr[i] = from_float<T>(to_float(rr[i]) * inv * to_float(w[i]));
}

}  // namespace octavo::cuda
