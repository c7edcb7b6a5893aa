// Launcher of fused MoE over weight-only int8 experts (moe_int8.cuh): moe_align's tiles (moe.cu),
// the gate_up and down GEMMs in the decode shape (few pairs: one unit per block) or several units
// per block, then the per-token sum. Every grid depends on tensor shapes only (CUDA graphs).
#include "cuda/moe_int8.cuh"

namespace octavo::cuda {

template <typename T, int NW, bool kUp>
static void launch_moe_int8_gemm(const MoeInt8Args& a, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(a.padded_len / kMoeBlockM);
  const int64_t units = kUp ? (a.w13.panels / 2 + 1) / 2 : (a.w2.panels + 1) / 2;
  const dim3 grid(tiles, static_cast<unsigned>((units + NW - 1) / NW)), block(kW8Warps * 32);
  if constexpr (!kUp) {
    launch(moe_int8_gemm_kernel<T, NW, false, 0>, grid, block, 0, stream, a);
  } else {
    switch (a.act) {
      case 0: launch(moe_int8_gemm_kernel<T, NW, true, 0>, grid, block, 0, stream, a); break;
      case 1: launch(moe_int8_gemm_kernel<T, NW, true, 1>, grid, block, 0, stream, a); break;
      default: launch(moe_int8_gemm_kernel<T, NW, true, 2>, grid, block, 0, stream, a); break;
    }
  }
}

template <typename T>
static void launch_fused_moe_int8_t(const MoeInt8Args& a, cudaStream_t stream) {
  // gate_up stages two units per warp column: at most two columns fit 48 KB of shared memory
  // (one for fp32, whose x tiles are three bf16 planes)
  constexpr int kUpNW = std::is_same_v<T, float> ? 1 : 2;
  const int64_t pairs = a.num_tokens * a.top_k;
  if (pairs > 0) {
    const MoeAlignArgs al{a.topk_ids, a.sorted_token_ids, a.expert_ids, a.num_tokens_post_pad,
                          pairs, a.padded_len, a.num_experts, kMoeBlockM};
    launch_moe_align(al, stream);
    if (pairs <= kMoeInt8DecodePairs) {
      launch_moe_int8_gemm<T, 1, true>(a, stream);
      launch_moe_int8_gemm<T, 1, false>(a, stream);
    } else {
      launch_moe_int8_gemm<T, kUpNW, true>(a, stream);
      launch_moe_int8_gemm<T, 4, false>(a, stream);
    }
  }
  launch(moe_int8_sum_kernel<T>, dim3(static_cast<unsigned>(a.num_tokens)), dim3(256), 0, stream, a);
}

bool launch_fused_moe_int8(const MoeInt8Args& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden_size == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] { launch_fused_moe_int8_t<scalar_t>(a, stream); })
}

}  // namespace octavo::cuda
