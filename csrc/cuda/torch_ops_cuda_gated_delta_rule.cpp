// Tensor-level CUDA entry point of the gated delta rule: check inputs
// (cuda/gated_delta_rule_args.h), set the device guard, take the current stream, launch
// (csrc/cuda/gated_delta_rule.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/gated_delta_rule_args.h"
#include "ops.h"

namespace octavo {

void gated_delta_rule_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                           at::Tensor& ssm_states,
                           const std::optional<at::Tensor>& query_start_loc,
                           const at::Tensor& state_indices,
                           const std::optional<at::Tensor>& has_initial_state, double scale,
                           bool use_qk_l2norm) {
  const cuda::GdrArgs a = cuda_args::gated_delta_rule(
      out, q, k, v, g, beta, ssm_states, query_start_loc, state_indices, has_initial_state, scale,
      use_qk_l2norm, at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(cuda::launch_gated_delta_rule(a, c10::cuda::getCurrentCUDAStream()),
              "gated_delta_rule: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace octavo
