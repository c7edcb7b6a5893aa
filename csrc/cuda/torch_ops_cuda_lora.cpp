// Tensor-level CUDA entry points of the LoRA kernels: check inputs (cuda/lora_args.h), set the
// device guard, take the current stream, call the launchers in csrc/cuda/lora.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/lora_args.h"
#include "ops.h"

namespace octavo {

void lora_shrink_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& indices, double scale) {
  const cuda::LoraShrinkArgs a = cuda_args::lora_shrink(out, x, w, indices, scale,
                                                        at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(cuda::launch_lora_shrink(a, c10::cuda::getCurrentCUDAStream()),
              "lora_shrink: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lora_expand_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& indices, int64_t offset) {
  const cuda::LoraExpandArgs a = cuda_args::lora_expand(out, x, w, indices, offset,
                                                        at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(cuda::launch_lora_expand(a, c10::cuda::getCurrentCUDAStream()),
              "lora_expand: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace octavo
