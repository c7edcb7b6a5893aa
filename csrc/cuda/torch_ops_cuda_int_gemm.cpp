// Tensor-level CUDA entry points of the INT4 weight-only, INT8 W8A8 and weight-only INT8 GEMMs,
// registered here for the schemas in torch_bindings.cpp (the CPU kernels' operands, so the same
// prepared weights and layers run on either device): check inputs, set the device guard, take the
// current stream, call the launchers in csrc/cuda/int{4,8}_gemm.cu and int8_woq_gemm.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int4_gemm_args.h"
#include "cuda/int8_gemm_args.h"
#include "cuda/int8_woq_gemm_args.h"

namespace octavo {
namespace {

void int4_gemm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                    const at::Tensor& scales_offsets, int64_t group_size,
                    const std::optional<at::Tensor>& bias) {
  const cuda::Int4GemmArgs a = cuda_args::int4_gemm(out, x, qweight, scales_offsets, group_size,
                                                    bias, at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(cuda::launch_int4_gemm(a, c10::cuda::getCurrentCUDAStream()), "int4_gemm: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void int8_gemm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                    const at::Tensor& w_scales, const at::Tensor& w_colsum,
                    const std::optional<at::Tensor>& input_scale,
                    const std::optional<at::Tensor>& input_zero_point, bool asymmetric,
                    const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda_args::Int8GemmCall call =
      cuda_args::int8_gemm(out, x, qweight, w_scales, w_colsum, input_scale, input_zero_point,
                           asymmetric, bias, at::DeviceType::CUDA);
  TORCH_CHECK(cuda::launch_int8_gemm(call.args, c10::cuda::getCurrentCUDAStream()),
              "int8_gemm: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void int8_woq_gemm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                        const at::Tensor& scales_offsets, int64_t group_size,
                        const std::optional<at::Tensor>& bias) {
  const cuda::Int8WoqGemmArgs a = cuda_args::int8_woq_gemm(out, x, qweight, scales_offsets, group_size,
                                                           bias, at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(cuda::launch_int8_woq_gemm(a, c10::cuda::getCurrentCUDAStream()),
              "int8_woq_gemm: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace octavo

TORCH_LIBRARY_IMPL(octavo, CUDA, m) {
  m.impl("int4_gemm", &octavo::int4_gemm_cuda);
  m.impl("int8_gemm", &octavo::int8_gemm_cuda);
  m.impl("int8_woq_gemm", &octavo::int8_woq_gemm_cuda);
}
