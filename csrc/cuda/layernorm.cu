// Launchers for the RMSNorm kernels (layernorm.cuh).
#include "cuda/layernorm.cuh"

namespace octavo::cuda {

static int norm_threads(int64_t hidden) {
  const int64_t t = (hidden + 31) / 32 * 32;
  return static_cast<int>(t < 1024 ? (t < 32 ? 32 : t) : 1024);
}

bool launch_rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(rms_norm_kernel<scalar_t>, dim3(a.num_tokens), dim3(norm_threads(a.hidden)), 0, stream,
           static_cast<scalar_t*>(a.out), static_cast<const scalar_t*>(a.x),
           static_cast<const scalar_t*>(a.weight), a.out_stride, a.x_stride,
           static_cast<int>(a.hidden), a.eps);
  });
}

bool launch_fused_add_rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(fused_add_rms_norm_kernel<scalar_t>, dim3(a.num_tokens), dim3(norm_threads(a.hidden)), 0,
           stream, static_cast<scalar_t*>(a.x), static_cast<scalar_t*>(a.residual),
           static_cast<const scalar_t*>(a.weight), a.x_stride, a.residual_stride,
           static_cast<int>(a.hidden), a.eps);
  });
}

}  // namespace octavo::cuda
