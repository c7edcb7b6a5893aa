// torch.ops.octavo_simt.gated_delta_rule: the csrc/cuda gated delta rule on CPU tensors under the
// SIMT emulator (test-only), with the same checks as the CUDA wrapper.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/gated_delta_rule_args.h"

namespace octavo::simt_ops {
namespace {

void gated_delta_rule(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                      at::Tensor& ssm_states, const std::optional<at::Tensor>& query_start_loc,
                      const at::Tensor& state_indices,
                      const std::optional<at::Tensor>& has_initial_state, double scale,
                      bool use_qk_l2norm) {
  TORCH_CHECK(cuda::launch_gated_delta_rule(
                  cuda_args::gated_delta_rule(out, q, k, v, g, beta, ssm_states, query_start_loc,
                                              state_indices, has_initial_state, scale,
                                              use_qk_l2norm, at::DeviceType::CPU),
                  nullptr),
              "gated_delta_rule: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("gated_delta_rule(Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, "
        "Tensor! ssm_states, Tensor? query_start_loc, Tensor state_indices, "
        "Tensor? has_initial_state, float scale, bool use_qk_l2norm) -> ()",
        &octavo::simt_ops::gated_delta_rule);
}
