// Launcher of fused MoE over 4-bit experts (moe_int4.cuh): moe_align's tiles (moe.cu), the
// gate_up and down GEMMs in the decode shape (few pairs: one panel per block) or four panels per
// block, then the per-token sum. Every grid depends on tensor shapes only (CUDA graphs).
#include "cuda/moe_int4.cuh"

namespace octavo::cuda {

template <typename T, int NW>
static void launch_moe_int4_gemms(const MoeInt4Args& a, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(a.padded_len / kMoeBlockM);
  const dim3 block(kI4Warps * 32);
  const dim3 up_grid(tiles, static_cast<unsigned>((a.w13.panels / 2 + NW - 1) / NW));
  switch (a.act) {
    case 0: launch(moe_int4_gemm_kernel<T, NW, true, 0>, up_grid, block, 0, stream, a); break;
    case 1: launch(moe_int4_gemm_kernel<T, NW, true, 1>, up_grid, block, 0, stream, a); break;
    default: launch(moe_int4_gemm_kernel<T, NW, true, 2>, up_grid, block, 0, stream, a); break;
  }
  const dim3 down_grid(tiles, static_cast<unsigned>((a.w2.panels + NW - 1) / NW));
  launch(moe_int4_gemm_kernel<T, NW, false, 0>, down_grid, block, 0, stream, a);
}

template <typename T>
static void launch_fused_moe_int4_t(const MoeInt4Args& a, cudaStream_t stream) {
  const int64_t pairs = a.num_tokens * a.top_k;
  const MoeAlignArgs al{a.topk_ids, a.sorted_token_ids, a.expert_ids, a.num_tokens_post_pad,
                        pairs, a.padded_len, a.num_experts, kMoeBlockM};
  launch_moe_align(al, stream);
  if (pairs <= kMoeInt4DecodePairs) launch_moe_int4_gemms<T, 1>(a, stream);
  else launch_moe_int4_gemms<T, 4>(a, stream);
  launch(moe_int4_sum_kernel<T>, dim3(static_cast<unsigned>(a.num_tokens)), dim3(256), 0, stream, a);
}

bool launch_fused_moe_int4(const MoeInt4Args& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden_size == 0) return true;
  switch (a.dtype) {
    case DType::kBFloat16: launch_fused_moe_int4_t<__nv_bfloat16>(a, stream); return true;
    case DType::kFloat16: launch_fused_moe_int4_t<__half>(a, stream); return true;
    default: return false;  // tensor cores: bf16 / fp16 activations only
  }
}

}  // namespace octavo::cuda
