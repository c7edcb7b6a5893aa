// torch.ops.octavo_simt.{topk_routing, moe_align, fused_moe, fused_moe_fp8}: the csrc/cuda MoE launchers on CPU
// tensors under the SIMT emulator (test-only), with the same checks as the CUDA wrappers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/moe_args.h"
#include "cuda/torch_args.h"

namespace octavo::simt_ops {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;

void topk_routing(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                  const std::string& scoring, bool renormalize, const std::optional<at::Tensor>& bias,
                  int64_t n_group, int64_t topk_group, const std::string& group_score,
                  double routed_scaling_factor) {
  TORCH_CHECK(cuda::launch_topk_routing(
                  cuda_args::topk_routing(topk_weights, topk_ids, gating_output, scoring, renormalize,
                                          bias, n_group, topk_group, group_score,
                                          routed_scaling_factor, kCPU),
                  nullptr),
              "topk_routing: unsupported dtype");
}

void moe_align(at::Tensor& sorted_token_ids, at::Tensor& expert_ids, at::Tensor& num_tokens_post_pad,
               const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  cuda::launch_moe_align(cuda_args::moe_align(sorted_token_ids, expert_ids, num_tokens_post_pad,
                                              topk_ids, num_experts, block_size, kCPU),
                         nullptr);
}

void fused_moe(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
               const at::Tensor& topk_weights, const at::Tensor& topk_ids, const std::string& activation) {
  cuda_args::MoeWorkspace ws;
  const cuda::FusedMoeArgs a =
      cuda_args::fused_moe(out, hidden, w13, w2, topk_weights, topk_ids, activation, kCPU, ws);
  // poisoned like the GPU's uninitialized memory: a read of an unwritten entry shows up as NaN
  ws.inter.fill_(NAN);
  ws.partial.fill_(NAN);
  ws.sorted_token_ids.fill_(-7);
  ws.expert_ids.fill_(-7);
  TORCH_CHECK(cuda::launch_fused_moe(a, nullptr), "fused_moe: unsupported dtype");
}

void fused_moe_fp8(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                   const at::Tensor& w2, const at::Tensor& w13_scale, const at::Tensor& w2_scale,
                   const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t block_k13,
                   int64_t block_k2, const std::string& activation) {
  cuda_args::MoeWorkspace ws;
  const cuda::FusedMoeArgs a =
      cuda_args::fused_moe_fp8(out, hidden, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids,
                               block_k13, block_k2, activation, kCPU, ws);
  ws.inter.fill_(NAN);
  ws.partial.fill_(NAN);
  ws.sorted_token_ids.fill_(-7);
  ws.expert_ids.fill_(-7);
  TORCH_CHECK(cuda::launch_fused_moe_fp8(a, nullptr), "fused_moe_fp8: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("topk_routing(Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, str scoring, "
        "bool renormalize, Tensor? bias, int n_group, int topk_group, str group_score, "
        "float routed_scaling_factor) -> ()", &octavo::simt_ops::topk_routing);
  m.def("moe_align(Tensor! sorted_token_ids, Tensor! expert_ids, Tensor! num_tokens_post_pad, "
        "Tensor topk_ids, int num_experts, int block_size) -> ()", &octavo::simt_ops::moe_align);
  m.def("fused_moe(Tensor! out, Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, "
        "Tensor topk_ids, str activation) -> ()", &octavo::simt_ops::fused_moe);
  m.def("fused_moe_fp8(Tensor! out, Tensor hidden, Tensor w13, Tensor w2, Tensor w13_scale, "
        "Tensor w2_scale, Tensor topk_weights, Tensor topk_ids, int block_k13, int block_k2, "
        "str activation) -> ()", &octavo::simt_ops::fused_moe_fp8);
}
