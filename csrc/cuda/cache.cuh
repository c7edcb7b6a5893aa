// Cache write kernel: key/value rows of each token go to their slot in the paged caches, copied
// or (fp8 caches) quantized (no torch headers).
#pragma once

#include <type_traits>

#include "cuda/fp8_kv.cuh"
#include "cuda/vec.cuh"

namespace octavo::cuda {

// N elements of a key/value row into a cache of element type C: a copy when C is T, else
// divided by scale and rounded to fp8 KV bytes.
template <typename T, typename C, int N>
__device__ __forceinline__ void cache_n(C* dst, const T* src, float scale) {
  if constexpr (std::is_same_v<C, T>) copy_n<T, N>(dst, src);
  else quantize_n<T, N>(dst, src, scale);
}

// grid: (T); the block writes the token's Hk * hd elements of key and value, N at a time
// (hd % N == 0). C: the cache element type (T, or Fp8Kv for an fp8 cache, which stores
// key / k_scale and value / v_scale).
template <typename T, typename C, int N>
__global__ void reshape_and_cache_kernel(CacheArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t slot = a.slot_mapping[t];
  if (slot < 0) return;  // padding token
  OCTAVO_DEVICE_CHECK(slot < a.num_slots, "reshape_and_cache: slot >= num_blocks * block_size");
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  const T* k = static_cast<const T*>(a.key) + t * a.k_stride_token;
  const T* v = static_cast<const T*>(a.value) + t * a.v_stride_token;
  C* kc = static_cast<C*>(a.key_cache) + block * a.kc_stride_block + offset * a.kc_stride_token;
  C* vc = static_cast<C*>(a.value_cache) + block * a.vc_stride_block + offset * a.vc_stride_token;
  const int nv = a.head_size / N;
  for (int idx = threadIdx.x; idx < a.num_kv_heads * nv; idx += blockDim.x) {
    const int h = idx / nv, d = idx % nv * N;
    cache_n<T, C, N>(kc + h * a.kc_stride_head + d, k + h * a.k_stride_head + d, a.k_scale);
    cache_n<T, C, N>(vc + h * a.vc_stride_head + d, v + h * a.v_stride_head + d, a.v_scale);
  }
}

}  // namespace octavo::cuda
