// torch.ops.octavo_simt.fused_moe_int8_packed: the csrc/cuda fused MoE over weight-only int8
// experts on CPU tensors under the SIMT emulator (test-only), with the same checks and schema as
// the CUDA op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/moe_int8_args.h"

namespace octavo::simt_ops {
namespace {

void fused_moe_int8_packed(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13_packed,
                           const at::Tensor& w2_packed, const at::Tensor& w13_scales_offsets,
                           const at::Tensor& w2_scales_offsets, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, int64_t inter_size, int64_t group_size13,
                           int64_t group_size2, const std::string& activation) {
  cuda_args::MoeWorkspace ws;
  const cuda::MoeInt8Args a = cuda_args::fused_moe_int8(
      out, hidden, w13_packed, w2_packed, w13_scales_offsets, w2_scales_offsets, topk_weights,
      topk_ids, inter_size, group_size13, group_size2, activation, at::DeviceType::CPU, ws);
  // poisoned like the GPU's uninitialized memory: a read of an unwritten entry shows up as NaN
  ws.inter.fill_(NAN);
  ws.partial.fill_(NAN);
  ws.sorted_token_ids.fill_(-7);
  ws.expert_ids.fill_(-7);
  TORCH_CHECK(cuda::launch_fused_moe_int8(a, nullptr), "fused_moe_int8_packed: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("fused_moe_int8_packed(Tensor! out, Tensor hidden, Tensor w13_packed, Tensor w2_packed, "
        "Tensor w13_scales_offsets, Tensor w2_scales_offsets, Tensor topk_weights, Tensor topk_ids, "
        "int inter_size, int group_size13, int group_size2, str activation) -> ()",
        &octavo::simt_ops::fused_moe_int8_packed);
}
