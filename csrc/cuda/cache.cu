// Launcher for the cache write kernel (cache.cuh).
#include "cuda/cache.cuh"

namespace octavo::cuda {
namespace {

// One thread per N-element piece of the token's heads, a multiple of 32 in [32, 512].
int cache_threads(const CacheArgs& a, int n) {
  const int pieces = a.num_kv_heads * a.head_size / n;
  return pieces < 32 ? 32 : (pieces > 512 ? 512 : (pieces + 31) / 32 * 32);
}

// C: the cache element type (T: a copy; Fp8Kv: rounded to fp8 KV bytes). N = Vec<T>::kElems
// elements at a time (16-byte loads of key/value rows, stores of N cache elements) where every
// row of key, value and both caches allows it, else one at a time.
template <typename T, typename C>
void launch_write(const CacheArgs& a, cudaStream_t stream) {
  constexpr int kN = Vec<T>::kElems;
  bool vec = can_vectorize<T>({a.key, a.value}, {a.head_size, a.k_stride_token, a.k_stride_head,
                                                 a.v_stride_token, a.v_stride_head});
  for (const void* p : {a.key_cache, a.value_cache})
    vec = vec && reinterpret_cast<uintptr_t>(p) % (kN * sizeof(C)) == 0;
  for (int64_t s : {a.kc_stride_block, a.kc_stride_token, a.kc_stride_head, a.vc_stride_block,
                    a.vc_stride_token, a.vc_stride_head})
    vec = vec && s % kN == 0;
  if (vec)
    launch(reshape_and_cache_kernel<T, C, kN>, dim3(a.num_tokens), dim3(cache_threads(a, kN)), 0,
           stream, a);
  else
    launch(reshape_and_cache_kernel<T, C, 1>, dim3(a.num_tokens), dim3(cache_threads(a, 1)), 0,
           stream, a);
}

}  // namespace

bool launch_reshape_and_cache(const CacheArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (a.cache_fp8) launch_write<scalar_t, Fp8Kv>(a, stream);
    else launch_write<scalar_t, scalar_t>(a, stream);
  });
}

}  // namespace octavo::cuda
