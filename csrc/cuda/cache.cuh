// Cache write kernel: key/value rows of each token go to their slot in the paged caches
// (no torch headers).
#pragma once

#include "cuda/vec.cuh"

namespace octavo::cuda {

// grid: (T); the block copies the token's Hk * hd elements of key and value, N at a time
// (hd % N == 0).
template <typename T, int N>
__global__ void reshape_and_cache_kernel(CacheArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t slot = a.slot_mapping[t];
  if (slot < 0) return;  // padding token
  OCTAVO_DEVICE_CHECK(slot < a.num_slots, "reshape_and_cache: slot >= num_blocks * block_size");
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  const T* k = static_cast<const T*>(a.key) + t * a.k_stride_token;
  const T* v = static_cast<const T*>(a.value) + t * a.v_stride_token;
  T* kc = static_cast<T*>(a.key_cache) + block * a.kc_stride_block + offset * a.kc_stride_token;
  T* vc = static_cast<T*>(a.value_cache) + block * a.vc_stride_block + offset * a.vc_stride_token;
  const int nv = a.head_size / N;
  for (int idx = threadIdx.x; idx < a.num_kv_heads * nv; idx += blockDim.x) {
    const int h = idx / nv, d = idx % nv * N;
    copy_n<T, N>(kc + h * a.kc_stride_head + d, k + h * a.k_stride_head + d);
    copy_n<T, N>(vc + h * a.vc_stride_head + d, v + h * a.v_stride_head + d);
  }
}

}  // namespace octavo::cuda
