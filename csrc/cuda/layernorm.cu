// Launchers for the RMSNorm kernels (layernorm.cuh): 16-byte accesses where every row and the
// weight allow them, scalar ones otherwise.
#include <type_traits>

#include "cuda/layernorm.cuh"

namespace octavo::cuda {

static int norm_threads(int64_t elems) {
  const int64_t t = (elems + 31) / 32 * 32;
  return static_cast<int>(t < 1024 ? (t < 32 ? 32 : t) : 1024);
}

// Runs body(std::integral_constant<int, N>) with N the vector width the args allow for T.
template <typename T, typename F>
void width_switch(const RmsNormArgs& a, F&& body) {
  const void* out = a.out != nullptr ? a.out : a.residual;
  const int64_t out_stride = a.out != nullptr ? a.out_stride : a.residual_stride;
  if (can_vectorize<T>({a.x, out, a.weight}, {a.hidden, a.x_stride, out_stride}))
    body(std::integral_constant<int, Vec<T>::kElems>{});
  else
    body(std::integral_constant<int, 1>{});
}

bool launch_rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    width_switch<scalar_t>(a, [&](auto n) {
      launch(rms_norm_kernel<scalar_t, n.value>, dim3(a.num_tokens),
             dim3(norm_threads(a.hidden / n.value)), 0, stream, static_cast<scalar_t*>(a.out),
             static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.weight),
             a.out_stride, a.x_stride, static_cast<int>(a.hidden), a.eps);
    });
  });
}

bool launch_fused_add_rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    width_switch<scalar_t>(a, [&](auto n) {
      launch(fused_add_rms_norm_kernel<scalar_t, n.value>, dim3(a.num_tokens),
             dim3(norm_threads(a.hidden / n.value)), 0, stream, static_cast<scalar_t*>(a.x),
             static_cast<scalar_t*>(a.residual), static_cast<const scalar_t*>(a.weight),
             a.x_stride, a.residual_stride, static_cast<int>(a.hidden), a.eps);
    });
  });
}

}  // namespace octavo::cuda
