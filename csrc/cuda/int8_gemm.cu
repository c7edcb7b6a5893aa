// Launcher of the INT8 W8A8 GEMM (int8_gemm.cuh): per-token quantization of x into the
// workspace, then the GEMM (decode shape for M <= 16); the grids depend on shapes only.
#include "cuda/int8_gemm.cuh"

namespace octavo::cuda {

template <typename T>
static void launch_int8_gemm_t(const Int8GemmArgs& a, cudaStream_t stream) {
  launch(int8_quantize_kernel<T>, dim3(static_cast<unsigned>(a.m)), dim3(kI8QuantThreads), 0, stream, a);
  const dim3 block(kI8Warps * 32);
  const int64_t units = (a.panels + 1) / 2;   // 32 outputs each
  if (a.m <= 16) {
    const dim3 grid(static_cast<unsigned>((units + 1) / 2), 1);
    launch(int8_gemm_kernel<T, 1, 2>, grid, block, 0, stream, a);
  } else {
    const dim3 grid(static_cast<unsigned>((units + 3) / 4), static_cast<unsigned>((a.m + 31) / 32));
    launch(int8_gemm_kernel<T, 2, 4>, grid, block, 0, stream, a);
  }
}

bool launch_int8_gemm(const Int8GemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] { launch_int8_gemm_t<scalar_t>(a, stream); })
}

}  // namespace octavo::cuda
