// Tensor-level CUDA entry points: check inputs (cuda/torch_args.h), set the device guard, take
// the current stream, call the raw launchers in csrc/cuda/*.cu (which stay free of torch headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>

#include "cuda/mamba_args.h"
#include "cuda/mla_args.h"
#include "cuda/ssd_args.h"
#include "cuda/fp8_gemm_args.h"
#include "cuda/moe_args.h"
#include "cuda/torch_args.h"
#include "ops.h"

namespace octavo {
namespace {

constexpr auto kCUDA = at::DeviceType::CUDA;

template <typename Args>
void run(bool (*launcher)(const Args&, cudaStream_t), const Args& a, const at::Tensor& on,
         const char* op) {
  const c10::cuda::CUDAGuard guard(on.device());
  TORCH_CHECK(launcher(a, c10::cuda::getCurrentCUDAStream()), op, ": unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void fp8_gemm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& scale, int64_t block_n, int64_t block_k,
                   const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias) {
  // e4m3 tensor cores on sm_89+ for e4m3 activations (W8A8) whose K steps fit the scale blocks
  const c10::cuda::CUDAGuard guard(x.device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  const int64_t kblocks = block_k > 0 ? (x.size(1) + block_k - 1) / block_k : 1;
  const bool fp8_mma = x_scale.has_value() && major * 10 + minor >= 89 &&
                       (kblocks == 1 || block_k % cuda::kFp8StepK32 == 0);
  run(cuda::launch_fp8_gemm,
      cuda_args::fp8_gemm(out, x, weight, scale, block_n, block_k, x_scale, bias, fp8_mma, kCUDA),
      x, "fp8_gemm");
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  run(cuda::launch_rms_norm, cuda_args::rms_norm(out, x, weight, eps, kCUDA), x, "rms_norm");
}

void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  run(cuda::launch_fused_add_rms_norm, cuda_args::fused_add_rms_norm(x, residual, weight, eps, kCUDA),
      x, "fused_add_rms_norm");
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& x) {
  run(cuda::launch_act_and_mul, cuda_args::act_and_mul(out, x, 0, "silu_and_mul", kCUDA), x,
      "silu_and_mul");
}

void gelu_and_mul_cuda(at::Tensor& out, const at::Tensor& x, const std::string& approximate) {
  const int kind = cuda_args::gelu_kind(approximate);
  run(cuda::launch_act_and_mul, cuda_args::act_and_mul(out, x, kind, "gelu_and_mul", kCUDA), x,
      "gelu_and_mul");
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query,
                           const std::optional<at::Tensor>& key, int64_t head_size,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  run(cuda::launch_rotary_embedding,
      cuda_args::rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, kCUDA),
      query, "rotary_embedding");
}

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale,
                            double v_scale) {
  run(cuda::launch_reshape_and_cache,
      cuda_args::reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale,
                                   v_scale, kCUDA),
      key, "reshape_and_cache");
}

void mla_paged_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                              const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                              const at::Tensor& block_table, double scale, int64_t kv_lora_rank) {
  run(cuda::launch_mla_paged_attention,
      cuda_args::mla_paged_attention(out, q, kv_cache, query_start_loc, seq_lens, block_table,
                                     scale, kv_lora_rank, kCUDA),
      q, "mla_paged_attention");
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                          const at::Tensor& seq_lens, const at::Tensor& block_table, double scale,
                          int64_t sliding_window, double soft_cap,
                          const std::optional<at::Tensor>& alibi_slopes, double k_scale,
                          double v_scale) {
  cuda::PagedAttentionArgs a =
      cuda_args::paged_attention(out, query, key_cache, value_cache, query_start_loc, seq_lens,
                                 block_table, scale, sliding_window, soft_cap, alibi_slopes,
                                 k_scale, v_scale, kCUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  // [T, Hq, partitions, hd + 2] split-context partials; from the caching allocator (and the
  // graph's pool under capture), sized by shapes only
  const int64_t ws = cuda::paged_attention_workspace_floats(a);
  at::Tensor workspace;
  if (ws > 0) {
    workspace = at::empty({ws}, query.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  TORCH_CHECK(cuda::launch_paged_attention(a, c10::cuda::getCurrentCUDAStream()),
              "paged_attention: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_routing_cuda(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                       const std::string& scoring, bool renormalize,
                       const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
                       const std::string& group_score, double routed_scaling_factor) {
  run(cuda::launch_topk_routing,
      cuda_args::topk_routing(topk_weights, topk_ids, gating_output, scoring, renormalize, bias,
                              n_group, topk_group, group_score, routed_scaling_factor, kCUDA),
      gating_output, "topk_routing");
}

void moe_align_cuda(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                    at::Tensor& num_tokens_post_pad, const at::Tensor& topk_ids,
                    int64_t num_experts, int64_t block_size) {
  run(cuda::launch_moe_align,
      cuda_args::moe_align(sorted_token_ids, expert_ids, num_tokens_post_pad, topk_ids, num_experts,
                           block_size, kCUDA),
      topk_ids, "moe_align");
}

void fused_moe_cuda(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                    const at::Tensor& w2, const at::Tensor& topk_weights,
                    const at::Tensor& topk_ids, const std::string& activation) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  cuda_args::MoeWorkspace ws;  // from the caching allocator (the graph's pool under capture)
  const cuda::FusedMoeArgs a =
      cuda_args::fused_moe(out, hidden, w13, w2, topk_weights, topk_ids, activation, kCUDA, ws);
  TORCH_CHECK(cuda::launch_fused_moe(a, c10::cuda::getCurrentCUDAStream()),
              "fused_moe: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_moe_fp8_cuda(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                        const at::Tensor& w2, const at::Tensor& w13_scale,
                        const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, int64_t block_k13, int64_t block_k2,
                        const std::string& activation) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  cuda_args::MoeWorkspace ws;  // from the caching allocator (the graph's pool under capture)
  const cuda::FusedMoeArgs a =
      cuda_args::fused_moe_fp8(out, hidden, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids,
                               block_k13, block_k2, activation, kCUDA, ws);
  TORCH_CHECK(cuda::launch_fused_moe_fp8(a, c10::cuda::getCurrentCUDAStream()),
              "fused_moe_fp8: unsupported dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void causal_conv1d_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                        const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                        const std::optional<at::Tensor>& has_initial_state, bool silu) {
  run(cuda::launch_causal_conv1d,
      cuda_args::causal_conv1d(out, x, weight, bias, conv_states, query_start_loc, state_indices,
                               has_initial_state, silu, kCUDA, "causal_conv1d"),
      x, "causal_conv1d");
}

void causal_conv1d_update_cuda(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_states,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& state_indices, bool silu) {
  run(cuda::launch_causal_conv1d,
      cuda_args::causal_conv1d(out, x, weight, bias, conv_states, std::nullopt, state_indices,
                               std::nullopt, silu, kCUDA, "causal_conv1d_update"),
      x, "causal_conv1d_update");
}

void selective_scan_cuda(at::Tensor& out, const at::Tensor& u, const at::Tensor& delta,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                         const std::optional<at::Tensor>& D_skip, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                         at::Tensor& ssm_states, const at::Tensor& query_start_loc,
                         const at::Tensor& state_indices,
                         const std::optional<at::Tensor>& has_initial_state) {
  run(cuda::launch_selective_scan,
      cuda_args::selective_scan(out, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus,
                                ssm_states, query_start_loc, state_indices, has_initial_state,
                                kCUDA, "selective_scan"),
      u, "selective_scan");
}

void selective_state_update_cuda(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                                 const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                                 const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                 const at::Tensor& state_indices) {
  run(cuda::launch_selective_scan,
      cuda_args::selective_scan(out, x, dt, A, B, C, D_skip, z, dt_bias, dt_softplus, ssm_states,
                                std::nullopt, state_indices, std::nullopt, kCUDA,
                                "selective_state_update"),
      x, "selective_state_update");
}

void ssd_chunk_scan_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& dt,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                         int64_t chunk_size, const std::optional<at::Tensor>& D_skip,
                         const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                         double dt_min, double dt_max, at::Tensor& ssm_states,
                         const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                         const std::optional<at::Tensor>& has_initial_state) {
  TORCH_CHECK(chunk_size > 0, "ssd_chunk_scan: chunk_size must be positive");
  run(cuda::launch_ssd,
      cuda_args::ssd(out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus, dt_min, dt_max, ssm_states,
                     &query_start_loc, state_indices, has_initial_state, "ssd_chunk_scan", kCUDA),
      x, "ssd_chunk_scan");
}

void ssd_state_update_cuda(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                           const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                           const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                           double dt_min, double dt_max, const at::Tensor& state_indices) {
  run(cuda::launch_ssd,
      cuda_args::ssd(out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus, dt_min, dt_max, ssm_states,
                     nullptr, state_indices, std::nullopt, "ssd_state_update", kCUDA),
      x, "ssd_state_update");
}

}  // namespace octavo
