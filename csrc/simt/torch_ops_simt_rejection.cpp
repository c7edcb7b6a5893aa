// torch.ops.octavo_simt.rejection_sample: the csrc/cuda rejection sampler on CPU tensors under
// the SIMT emulator (test-only), with the same checks as the CUDA wrapper.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/rejection_args.h"

namespace octavo::simt_ops {
namespace {

void rejection_sample(at::Tensor& out, const at::Tensor& draft_token_ids,
                      const at::Tensor& num_draft_tokens,
                      const std::optional<at::Tensor>& draft_probs,
                      const at::Tensor& target_probs, const at::Tensor& uniform,
                      const at::Tensor& exp_noise, const at::Tensor& greedy) {
  TORCH_CHECK(cuda::launch_rejection_sample(
                  cuda_args::rejection_sample(out, draft_token_ids, num_draft_tokens, draft_probs,
                                              target_probs, uniform, exp_noise, greedy,
                                              at::DeviceType::CPU),
                  nullptr),
              "rejection_sample: launch failed");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("rejection_sample(Tensor! out, Tensor draft_token_ids, Tensor num_draft_tokens, "
        "Tensor? draft_probs, Tensor target_probs, Tensor uniform, Tensor exp_noise, "
        "Tensor greedy) -> ()",
        &octavo::simt_ops::rejection_sample);
}
