// Launchers of the MoE kernels (moe.cuh). Every grid depends on tensor shapes only, never on the
// routing, so fused_moe can be captured in a CUDA graph.
#include "cuda/moe.cuh"

namespace octavo::cuda {

bool launch_topk_routing(const TopkRoutingArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return true;
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((a.num_tokens + threads - 1) / threads));
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(topk_routing_kernel<scalar_t>, grid, dim3(threads), 0, stream, a);
  });
}

bool launch_moe_align(const MoeAlignArgs& a, cudaStream_t stream) {
  const size_t smem = (2 * size_t(a.num_experts) + 1) * sizeof(int32_t);
  launch(moe_align_kernel, dim3(1), dim3(1024), smem, stream, a);
  return true;
}

template <typename T, int N, typename W = T>
static void launch_gemms(const FusedMoeArgs& a, unsigned tiles, cudaStream_t stream) {
  const dim3 up_grid(tiles, static_cast<unsigned>((a.inter_size + kMoeBlockN - 1) / kMoeBlockN));
  switch (a.act) {
    case 0: launch(moe_gate_up_kernel<T, 0, N, W>, up_grid, dim3(kMoeThreads), 0, stream, a); break;
    case 1: launch(moe_gate_up_kernel<T, 1, N, W>, up_grid, dim3(kMoeThreads), 0, stream, a); break;
    default: launch(moe_gate_up_kernel<T, 2, N, W>, up_grid, dim3(kMoeThreads), 0, stream, a); break;
  }
  const dim3 down_grid(tiles, static_cast<unsigned>((a.hidden_size + kMoeBlockN - 1) / kMoeBlockN));
  launch(moe_down_kernel<T, N, W>, down_grid, dim3(kMoeThreads), 0, stream, a);
}

// e4m3 experts: the weights are staged element by element (dequantized), activations as usual
template <typename T>
static void launch_fused_moe_fp8_t(const FusedMoeArgs& a, cudaStream_t stream) {
  MoeAlignArgs al{a.topk_ids, a.sorted_token_ids, a.expert_ids, a.num_tokens_post_pad,
                  a.num_tokens * a.top_k, a.padded_len, a.num_experts, kMoeBlockM};
  launch_moe_align(al, stream);
  const unsigned tiles = static_cast<unsigned>(a.padded_len / kMoeBlockM);
  if (can_vectorize<T>({a.hidden, a.inter}, {a.hidden_size, a.inter_size, a.hidden_stride}))
    launch_gemms<T, Vec<T>::kElems, uint8_t>(a, tiles, stream);
  else
    launch_gemms<T, 1, uint8_t>(a, tiles, stream);
  launch(moe_sum_kernel<T>, dim3(static_cast<unsigned>(a.num_tokens)), dim3(256), 0, stream, a);
}

bool launch_fused_moe_fp8(const FusedMoeArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden_size == 0) return true;
  switch (a.dtype) {
    case DType::kBFloat16: launch_fused_moe_fp8_t<__nv_bfloat16>(a, stream); return true;
    case DType::kFloat16: launch_fused_moe_fp8_t<__half>(a, stream); return true;
    default: return false;  // tensor cores: bf16 / fp16 only
  }
}

template <typename T>
static void launch_fused_moe_t(const FusedMoeArgs& a, cudaStream_t stream) {
  MoeAlignArgs al{a.topk_ids, a.sorted_token_ids, a.expert_ids, a.num_tokens_post_pad,
                  a.num_tokens * a.top_k, a.padded_len, a.num_experts, kMoeBlockM};
  launch_moe_align(al, stream);
  const unsigned tiles = static_cast<unsigned>(a.padded_len / kMoeBlockM);
  // 16-byte staging copies where every row start is 16-byte aligned
  if (can_vectorize<T>({a.hidden, a.w13, a.w2, a.inter}, {a.hidden_size, a.inter_size, a.hidden_stride}))
    launch_gemms<T, Vec<T>::kElems>(a, tiles, stream);
  else
    launch_gemms<T, 1>(a, tiles, stream);
  launch(moe_sum_kernel<T>, dim3(static_cast<unsigned>(a.num_tokens)), dim3(256), 0, stream, a);
}

bool launch_fused_moe(const FusedMoeArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.hidden_size == 0) return true;
  switch (a.dtype) {
    case DType::kBFloat16: launch_fused_moe_t<__nv_bfloat16>(a, stream); return true;
    case DType::kFloat16: launch_fused_moe_t<__half>(a, stream); return true;
    default: return false;  // tensor cores: bf16 / fp16 only
  }
}

}  // namespace octavo::cuda
