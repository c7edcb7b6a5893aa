// Batched LoRA kernels (punica's BGMV shape): each token row uses its own adapter slot, read
// from indices on the device (no host sync, graph-capturable); fp32 math.
#pragma once

#include "cuda/launch.cuh"
#include "cuda/lora_params.h"

namespace octavo::cuda {

// grid: (T, ceil(R / kLoraShrinkWarps)), block: 32 * kLoraShrinkWarps. Warp w of block (t, b)
// computes out[t, b * kLoraShrinkWarps + w] = scale * dot(w[slot, r, :], x[t, :]).
template <typename T>
__global__ void lora_shrink_kernel(float* __restrict__ out, const T* __restrict__ x,
                                   const T* __restrict__ w, const int64_t* __restrict__ indices,
                                   int64_t out_stride, int64_t x_stride, int64_t num_slots,
                                   int64_t rank, int64_t k, float scale) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.y) * kLoraShrinkWarps + threadIdx.x / 32;
  if (r >= rank) return;                       // whole warps leave together
  const int64_t slot = indices[t];
  float acc = 0.f;
  if (slot >= 0 && slot < num_slots) {
    const T* xr = x + t * x_stride;
    const T* wr = w + (slot * rank + r) * k;
    for (int64_t i = lane; i < k; i += 32) acc += to_float(wr[i]) * to_float(xr[i]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    acc *= scale;
  }
  if (lane == 0) out[t * out_stride + r] = acc;
}

// grid: (T, ceil(N / kLoraExpandThreads)), block: kLoraExpandThreads; thread c adds
// dot(w[slot, c, :], x[t, :]) to out[t, offset + c], the x row staged in shared memory.
template <typename T>
__global__ void lora_expand_kernel(T* __restrict__ out, const float* __restrict__ x,
                                   const T* __restrict__ w, const int64_t* __restrict__ indices,
                                   int64_t out_stride, int64_t x_stride, int64_t num_slots,
                                   int64_t n, int64_t rank, int64_t offset) {
  OCTAVO_DYNAMIC_SHARED(float, xs);            // [rank]
  const int64_t t = blockIdx.x;
  const int64_t slot = indices[t];
  if (slot < 0 || slot >= num_slots) return;   // the whole block: no barrier is skipped
  for (int64_t i = threadIdx.x; i < rank; i += blockDim.x) xs[i] = x[t * x_stride + i];
  __syncthreads();
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  const T* wr = w + (slot * n + c) * rank;
  float acc = 0.f;
  for (int64_t i = 0; i < rank; ++i) acc += to_float(wr[i]) * xs[i];
  T* o = out + t * out_stride + offset + c;
  *o = from_float<T>(to_float(*o) + acc);
}

}  // namespace octavo::cuda
