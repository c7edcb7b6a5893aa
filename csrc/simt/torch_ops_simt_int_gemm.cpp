// torch.ops.octavo_simt.{int4_gemm, int8_gemm}: the csrc/cuda INT4 / INT8 GEMM launchers on CPU
// tensors under the SIMT emulator (test-only), with the same checks and schemas as the CUDA ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/int4_gemm_args.h"
#include "cuda/int8_gemm_args.h"

namespace octavo::simt_ops {
namespace {

void int4_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
               const at::Tensor& scales_offsets, int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(cuda::launch_int4_gemm(cuda_args::int4_gemm(out, x, qweight, scales_offsets, group_size,
                                                          bias, at::DeviceType::CPU),
                                     nullptr),
              "int4_gemm: unsupported dtype");
}

void int8_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
               const at::Tensor& w_colsum, const std::optional<at::Tensor>& input_scale,
               const std::optional<at::Tensor>& input_zero_point, bool asymmetric,
               const std::optional<at::Tensor>& bias) {
  const cuda_args::Int8GemmCall call = cuda_args::int8_gemm(
      out, x, qweight, w_scales, w_colsum, input_scale, input_zero_point, asymmetric, bias,
      at::DeviceType::CPU);
  TORCH_CHECK(cuda::launch_int8_gemm(call.args, nullptr), "int8_gemm: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("int4_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor scales_offsets, int group_size, "
        "Tensor? bias) -> ()", &octavo::simt_ops::int4_gemm);
  m.def("int8_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor w_scales, Tensor w_colsum, "
        "Tensor? input_scale, Tensor? input_zero_point, bool asymmetric, Tensor? bias) -> ()",
        &octavo::simt_ops::int8_gemm);
}
