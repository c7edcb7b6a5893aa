// Launcher of the INT4 weight-only GEMM (int4_gemm.cuh): the decode shape (one 32-output panel
// per block) for M <= 16, else 32 rows x 128 outputs per block; the grid depends on shapes only.
#include "cuda/int4_gemm.cuh"

namespace octavo::cuda {

template <typename T>
static void launch_int4_gemm_t(const Int4GemmArgs& a, cudaStream_t stream) {
  const dim3 block(kI4Warps * 32);
  if (a.m <= 16) {
    const dim3 grid(static_cast<unsigned>(a.panels), 1);
    launch(int4_gemm_kernel<T, 1, 1>, grid, block, 0, stream, a);
  } else {
    const dim3 grid(static_cast<unsigned>((a.panels + 3) / 4), static_cast<unsigned>((a.m + 31) / 32));
    launch(int4_gemm_kernel<T, 2, 4>, grid, block, 0, stream, a);
  }
}

bool launch_int4_gemm(const Int4GemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return true;
  switch (a.dtype) {
    case DType::kBFloat16: launch_int4_gemm_t<__nv_bfloat16>(a, stream); return true;
    case DType::kFloat16: launch_int4_gemm_t<__half>(a, stream); return true;
    default: return false;  // tensor cores: bf16 / fp16 activations only
  }
}

}  // namespace octavo::cuda
