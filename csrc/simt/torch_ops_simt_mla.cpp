// torch.ops.octavo_simt.mla_paged_attention: the csrc/cuda MLA launcher on CPU tensors under the
// SIMT emulator (test-only), with the same checks as the CUDA wrapper.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/mla_args.h"

namespace octavo::simt_ops {
namespace {

void mla_paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                         const at::Tensor& block_table, double scale, int64_t kv_lora_rank) {
  const cuda::MlaAttentionArgs a = cuda_args::mla_paged_attention(
      out, q, kv_cache, query_start_loc, seq_lens, block_table, scale, kv_lora_rank,
      at::DeviceType::CPU);
  TORCH_CHECK(cuda::launch_mla_paged_attention(a, nullptr), "mla_paged_attention: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("mla_paged_attention(Tensor! out, Tensor q, Tensor kv_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_table, float scale, int kv_lora_rank) -> ()",
        &octavo::simt_ops::mla_paged_attention);
}
