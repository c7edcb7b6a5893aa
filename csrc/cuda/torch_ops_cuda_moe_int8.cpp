// Tensor-level CUDA entry point of fused MoE over weight-only int8 experts, registered here for the
// fused_moe_int8_packed schema in torch_bindings.cpp (the CPU kernel's operands,
// ops_native.prepare_moe_int8_weights, so the same prepared experts run on either device): check
// inputs, set the device guard, take the current stream, call the launcher in cuda/moe_int8.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/moe_int8_args.h"

namespace octavo {
namespace {

void fused_moe_int8_packed_cuda(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13_packed,
                                const at::Tensor& w2_packed, const at::Tensor& w13_scales_offsets,
                                const at::Tensor& w2_scales_offsets, const at::Tensor& topk_weights,
                                const at::Tensor& topk_ids, int64_t inter_size, int64_t group_size13,
                                int64_t group_size2, const std::string& activation) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  cuda_args::MoeWorkspace ws;  // allocated on the current stream (a captured graph's pool)
  const cuda::MoeInt8Args a = cuda_args::fused_moe_int8(
      out, hidden, w13_packed, w2_packed, w13_scales_offsets, w2_scales_offsets, topk_weights,
      topk_ids, inter_size, group_size13, group_size2, activation, at::DeviceType::CUDA, ws);
  TORCH_CHECK(cuda::launch_fused_moe_int8(a, c10::cuda::getCurrentCUDAStream()),
              "fused_moe_int8_packed: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace octavo

TORCH_LIBRARY_IMPL(octavo, CUDA, m) {
  m.impl("fused_moe_int8_packed", &octavo::fused_moe_int8_packed_cuda);
}
