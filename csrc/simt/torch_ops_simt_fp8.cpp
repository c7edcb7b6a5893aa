// torch.ops.octavo_simt.fp8_gemm: the csrc/cuda FP8 GEMM launcher on CPU tensors under the SIMT
// emulator (test-only), with the same checks as the CUDA wrapper. `fp8_mma` picks the sm_89+
// e4m3 tensor-core path (else the sm_80 one), as the CUDA wrapper does from the device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/fp8_gemm_args.h"

namespace octavo::simt_ops {
namespace {

void fp8_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
              int64_t block_n, int64_t block_k, const std::optional<at::Tensor>& x_scale,
              const std::optional<at::Tensor>& bias, bool fp8_mma) {
  const cuda::Fp8GemmArgs a = cuda_args::fp8_gemm(out, x, weight, scale, block_n, block_k, x_scale,
                                                  bias, fp8_mma, at::DeviceType::CPU);
  TORCH_CHECK(cuda::launch_fp8_gemm(a, nullptr), "fp8_gemm: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("fp8_gemm(Tensor! out, Tensor x, Tensor weight, Tensor scale, int block_n, int block_k, "
        "Tensor? x_scale, Tensor? bias, bool fp8_mma) -> ()", &octavo::simt_ops::fp8_gemm);
}
