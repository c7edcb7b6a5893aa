// Tensor-level CUDA entry point of the rejection sampler: check inputs
// (cuda/rejection_args.h), set the device guard, take the current stream, launch
// (csrc/cuda/rejection.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/rejection_args.h"
#include "ops.h"

namespace octavo {

void rejection_sample_cuda(at::Tensor& out, const at::Tensor& draft_token_ids,
                           const at::Tensor& num_draft_tokens,
                           const std::optional<at::Tensor>& draft_probs,
                           const at::Tensor& target_probs, const at::Tensor& uniform,
                           const at::Tensor& exp_noise, const at::Tensor& greedy) {
  const cuda::RejectionArgs a = cuda_args::rejection_sample(
      out, draft_token_ids, num_draft_tokens, draft_probs, target_probs, uniform, exp_noise,
      greedy, at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  TORCH_CHECK(cuda::launch_rejection_sample(a, c10::cuda::getCurrentCUDAStream()),
              "rejection_sample: launch failed");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace octavo
