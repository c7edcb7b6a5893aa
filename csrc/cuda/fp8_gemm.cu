// Launcher of the FP8 (E4M3) weight GEMM (fp8_gemm.cuh): one 16-row x 64-column tile per block,
// four warps; the grid depends on shapes only (CUDA-graph safe).
#include "cuda/fp8_gemm.cuh"

namespace octavo::cuda {

// Whether the e4m3 tensor-core kernel this device runs was compiled for sm_89+ (an sm_89 GPU
// can run the sm_80 binary of a build without sm_89, where that kernel only traps).
template <typename T>
static bool fp8_mma_compiled() {
#ifdef OCTAVO_SIMT
  return true;
#else
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, fp8_gemm_kernel<T, true, true>) == cudaSuccess &&
         attr.binaryVersion >= 89;
#endif
}

template <typename T>
static void launch_fp8_gemm_t(const Fp8GemmArgs& a, dim3 grid, cudaStream_t stream) {
  const dim3 block(kFp8Warps * 32);
  if (a.fp8_mma && fp8_mma_compiled<T>()) launch(fp8_gemm_kernel<T, true, true>, grid, block, 0, stream, a);
  else if (a.x_scale != nullptr) launch(fp8_gemm_kernel<T, true, false>, grid, block, 0, stream, a);
  else launch(fp8_gemm_kernel<T, false, false>, grid, block, 0, stream, a);
}

bool launch_fp8_gemm(const Fp8GemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return true;
  const dim3 grid(static_cast<unsigned>((a.n + kFp8BlockN - 1) / kFp8BlockN),
                  static_cast<unsigned>((a.m + kFp8BlockM - 1) / kFp8BlockM));
  switch (a.dtype) {
    case DType::kBFloat16: launch_fp8_gemm_t<__nv_bfloat16>(a, grid, stream); return true;
    case DType::kFloat16: launch_fp8_gemm_t<__half>(a, grid, stream); return true;
    default: return false;  // tensor cores: bf16 / fp16 outputs only
  }
}

}  // namespace octavo::cuda
