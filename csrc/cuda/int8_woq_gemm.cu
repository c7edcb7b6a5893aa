// Launcher of the weight-only INT8 GEMM (int8_woq_gemm.cuh): the decode shape (one 32-output unit
// per block) for M <= 16, else 4 units x 32 rows (16 for fp32, whose x tiles are three bf16
// planes) per block; the grid depends on shapes only.
#include "cuda/int8_woq_gemm.cuh"

namespace octavo::cuda {

template <typename T>
static void launch_int8_woq_gemm_t(const Int8WoqGemmArgs& a, cudaStream_t stream) {
  constexpr int kMT = std::is_same_v<T, float> ? 1 : 2;   // m16 tiles per prefill block
  const dim3 block(kW8Warps * 32);
  const int64_t units = (a.panels + 1) / 2;
  if (a.m <= 16) {
    launch(int8_woq_gemm_kernel<T, 1, 1>, dim3(static_cast<unsigned>(units)), block, 0, stream, a);
  } else {
    const dim3 grid(static_cast<unsigned>((units + 3) / 4),
                    static_cast<unsigned>((a.m + 16 * kMT - 1) / (16 * kMT)));
    launch(int8_woq_gemm_kernel<T, kMT, 4>, grid, block, 0, stream, a);
  }
}

bool launch_int8_woq_gemm(const Int8WoqGemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] { launch_int8_woq_gemm_t<scalar_t>(a, stream); })
}

}  // namespace octavo::cuda
