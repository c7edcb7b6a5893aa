// Launcher for the cache write kernel (cache.cuh).
#include "cuda/cache.cuh"

namespace octavo::cuda {

bool launch_reshape_and_cache(const CacheArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  const int n = a.num_kv_heads * a.head_size;
  const int threads = n < 32 ? 32 : (n > 512 ? 512 : (n + 31) / 32 * 32);
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(reshape_and_cache_kernel<scalar_t>, dim3(a.num_tokens), dim3(threads), 0, stream, a);
  });
}

}  // namespace octavo::cuda
