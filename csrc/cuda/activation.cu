// Launcher for the gated activation kernels (activation.cuh).
#include "cuda/activation.cuh"

namespace octavo::cuda {

bool launch_act_and_mul(const ActArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.d == 0) return true;
  const int threads = 256;
  const dim3 grid(a.num_tokens, static_cast<unsigned>((a.d + threads - 1) / threads));
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    auto* out = static_cast<scalar_t*>(a.out);
    auto* x = static_cast<const scalar_t*>(a.x);
    switch (a.kind) {
      case 0: launch(act_and_mul_kernel<scalar_t, 0>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
      case 1: launch(act_and_mul_kernel<scalar_t, 1>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
      default: launch(act_and_mul_kernel<scalar_t, 2>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
    }
  });
}

}  // namespace octavo::cuda
