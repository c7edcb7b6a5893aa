// Launcher for the cache write kernel (cache.cuh).
#include "cuda/cache.cuh"

namespace octavo::cuda {

bool launch_reshape_and_cache(const CacheArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    // 16-byte copies where every row of key, value and both caches allows them
    const bool vec = can_vectorize<scalar_t>(
        {a.key, a.value, a.key_cache, a.value_cache},
        {a.head_size, a.k_stride_token, a.k_stride_head, a.v_stride_token, a.v_stride_head,
         a.kc_stride_block, a.kc_stride_token, a.kc_stride_head, a.vc_stride_block,
         a.vc_stride_token, a.vc_stride_head});
    const int n = a.num_kv_heads * a.head_size / (vec ? Vec<scalar_t>::kElems : 1);
    const int threads = n < 32 ? 32 : (n > 512 ? 512 : (n + 31) / 32 * 32);
    if (vec)
      launch(reshape_and_cache_kernel<scalar_t, Vec<scalar_t>::kElems>, dim3(a.num_tokens),
             dim3(threads), 0, stream, a);
    else
      launch(reshape_and_cache_kernel<scalar_t, 1>, dim3(a.num_tokens), dim3(threads), 0, stream, a);
  });
}

}  // namespace octavo::cuda
