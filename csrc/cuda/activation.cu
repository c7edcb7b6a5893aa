// Launcher for the gated activation kernels (activation.cuh): 16-byte accesses where the rows
// allow them, scalar ones otherwise.
#include "cuda/activation.cuh"

namespace octavo::cuda {

template <typename T, int N>
void launch_act(const ActArgs& a, cudaStream_t stream) {
  const int threads = 256;
  const int64_t per_row = a.d / N;
  const dim3 grid(a.num_tokens, static_cast<unsigned>((per_row + threads - 1) / threads));
  auto* out = static_cast<T*>(a.out);
  auto* x = static_cast<const T*>(a.x);
  switch (a.kind) {
    case 0: launch(act_and_mul_kernel<T, 0, N>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
    case 1: launch(act_and_mul_kernel<T, 1, N>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
    default: launch(act_and_mul_kernel<T, 2, N>, grid, dim3(threads), 0, stream, out, x, a.out_stride, a.x_stride, a.d); break;
  }
}

bool launch_act_and_mul(const ActArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.d == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (can_vectorize<scalar_t>({a.out, a.x}, {a.d, a.out_stride, a.x_stride}))
      launch_act<scalar_t, Vec<scalar_t>::kElems>(a, stream);
    else
      launch_act<scalar_t, 1>(a, stream);
  });
}

}  // namespace octavo::cuda
