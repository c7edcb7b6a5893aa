// torch.ops.octavo_simt.int8_woq_gemm: the csrc/cuda weight-only INT8 GEMM launcher on CPU tensors
// under the SIMT emulator (test-only), with the same checks and schema as the CUDA op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/int8_woq_gemm_args.h"

namespace octavo::simt_ops {
namespace {

void int8_woq_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                   const at::Tensor& scales_offsets, int64_t group_size,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(cuda::launch_int8_woq_gemm(cuda_args::int8_woq_gemm(out, x, qweight, scales_offsets,
                                                                  group_size, bias, at::DeviceType::CPU),
                                         nullptr),
              "int8_woq_gemm: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("int8_woq_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor scales_offsets, int group_size, "
        "Tensor? bias) -> ()", &octavo::simt_ops::int8_woq_gemm);
}
