// torch.ops.octavo_simt.{lora_shrink, lora_expand}: the csrc/cuda LoRA launchers on CPU tensors
// under the SIMT emulator (test-only), with the same checks as the CUDA wrappers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/lora_args.h"

namespace octavo::simt_ops {
namespace {

void lora_shrink(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& indices, double scale) {
  TORCH_CHECK(cuda::launch_lora_shrink(
                  cuda_args::lora_shrink(out, x, w, indices, scale, at::DeviceType::CPU), nullptr),
              "lora_shrink: unsupported dtype");
}

void lora_expand(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& indices, int64_t offset) {
  TORCH_CHECK(cuda::launch_lora_expand(
                  cuda_args::lora_expand(out, x, w, indices, offset, at::DeviceType::CPU), nullptr),
              "lora_expand: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("lora_shrink(Tensor! out, Tensor x, Tensor w, Tensor indices, float scale) -> ()",
        &octavo::simt_ops::lora_shrink);
  m.def("lora_expand(Tensor! out, Tensor x, Tensor w, Tensor indices, int offset) -> ()",
        &octavo::simt_ops::lora_expand);
}
