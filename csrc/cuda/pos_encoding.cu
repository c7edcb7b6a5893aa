// Launcher for the rotary embedding kernel (pos_encoding.cuh).
#include "cuda/pos_encoding.cuh"

namespace octavo::cuda {

bool launch_rotary_embedding(const RotaryArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  const int pairs = (a.num_q_heads + (a.key ? a.num_k_heads : 0)) * (a.rot_dim / 2);
  const int threads = pairs < 32 ? 32 : (pairs > 512 ? 512 : (pairs + 31) / 32 * 32);
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (a.cos_sin_is_float)
      launch(rotary_embedding_kernel<scalar_t, float>, dim3(a.num_tokens), dim3(threads), 0, stream, a);
    else
      launch(rotary_embedding_kernel<scalar_t, scalar_t>, dim3(a.num_tokens), dim3(threads), 0, stream, a);
  });
}

}  // namespace octavo::cuda
