// Every octavo op's C++ declaration; schemas in torch_bindings.cpp, semantics in INTERFACES.md.
// Shapes: T tokens, H hidden, Hq/Hk query/kv heads, hd head size, S sequences.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace torch {
class Library;
}

namespace octavo {

// registers the octavo.DecoderPlan class (csrc/cpu/decoder_plan.cpp) on the library
void register_decoder_plan(torch::Library& m);

// ---- CPU (csrc/cpu/*.cpp) ----
void rms_norm_cpu(at::Tensor& out,           // [T, H]
                  const at::Tensor& x,       // [T, H]
                  const at::Tensor& weight,  // [H]
                  double eps);
void fused_add_rms_norm_cpu(at::Tensor& x,          // [T, H] in: input, out: normed
                            at::Tensor& residual,   // [T, H] in: residual, out: x + residual
                            const at::Tensor& weight,  // [H]
                            double eps);
void linear_cpu(at::Tensor& out,                      // [M, N]
                const at::Tensor& x,                  // [M, K]
                const at::Tensor& weight,             // [N, K]
                const std::optional<at::Tensor>& bias);  // [N]
void linear_packed_cpu(at::Tensor& out,                      // [M, N]
                       const at::Tensor& x,                  // [M, K] bf16
                       const at::Tensor& packed,             // [ceil(N/64), ceil(K/2), 64, 2]
                       const std::optional<at::Tensor>& bias);  // [N]
// weight [N, K] (2- or 4-byte elements) -> out [ceil(N/64), ceil(K/2), 64, 2]: linear_packed's
// layout, as ops_native.pack_linear_panels (zero padded)
void pack_linear_panels_cpu(at::Tensor& out, const at::Tensor& weight);
// codes uint8 [N, K], scales and offsets float32 [N, G] -> int4_gemm's packed [ceil(N/32),
// ceil(K/2), 32] and scales_offsets [ceil(N/32), G, 2, 32], as ops_native.pack_int4_panels
void pack_int4_panels_cpu(at::Tensor& packed, at::Tensor& scales_offsets, const at::Tensor& qweight,
                          const at::Tensor& scales, const at::Tensor& offsets);
// raw GGUF Q4_0 (ggml_type 2) / Q4_1 (3) blocks uint8 [rows, row bytes] -> codes uint8 [rows, K],
// d and m float32 [rows, K/32] (W = codes * d + m), as gguf_loader.q4_blocks
void gguf_q4_blocks_cpu(at::Tensor& codes, at::Tensor& d, at::Tensor& m, const at::Tensor& raw,
                        int64_t ggml_type);
void int4_gemm_cpu(at::Tensor& out,                    // [M, N]
                   const at::Tensor& x,                // [M, K] (K in the packed order)
                   const at::Tensor& qweight,          // uint8 [ceil(N/32), ceil(K/2), 32]
                   const at::Tensor& scales_offsets,   // float32 [ceil(N/32), G, 2, 32]
                   int64_t group_size,
                   const std::optional<at::Tensor>& bias);  // [N]
void fp8_gemm_cpu(at::Tensor& out,                       // [M, N]
                  const at::Tensor& x,                   // [M, K] (e4m3 bytes with x_scale)
                  const at::Tensor& weight,              // float8_e4m3fn / uint8 [N, K]
                  const at::Tensor& scale,               // float32 [ceil(N/bn), ceil(K/bk)]
                  int64_t block_n, int64_t block_k,
                  const std::optional<at::Tensor>& x_scale,  // float32 [M] (W8A8)
                  const std::optional<at::Tensor>& bias);    // [N]
void int8_gemm_cpu(at::Tensor& out,                    // [M, N]
                   const at::Tensor& x,                // [M, K], quantized per token inside
                   const at::Tensor& qweight,          // int8 [ceil(N/16), ceil(K/2), 16, 2]
                   const at::Tensor& w_scales,         // float32 [N]
                   const at::Tensor& w_colsum,         // int32 [N]
                   const std::optional<at::Tensor>& input_scale,       // [1] static, or dynamic
                   const std::optional<at::Tensor>& input_zero_point,  // [1] int32
                   bool asymmetric,
                   const std::optional<at::Tensor>& bias);  // [N]
void int8_woq_gemm_cpu(at::Tensor& out,                // [M, N]
                       const at::Tensor& x,            // [M, K]
                       const at::Tensor& qweight,      // int8 [ceil(N/16), K, 16]
                       const at::Tensor& scales_offsets,  // float32 [ceil(N/16), G, 2, 16]
                       int64_t group_size,
                       const std::optional<at::Tensor>& bias);  // [N]
void argmax_rows_cpu(at::Tensor& out,       // [N] int64: torch.argmax(x, dim=-1)
                     const at::Tensor& x);  // [N, V] float32
void silu_and_mul_cpu(at::Tensor& out,      // [T, D]
                      const at::Tensor& x);  // [T, 2*D]
void gelu_and_mul_cpu(at::Tensor& out,       // [T, D]
                      const at::Tensor& x,   // [T, 2*D]
                      const std::string& approximate);  // "none" | "tanh"
void rotary_embedding_cpu(const at::Tensor& positions,  // [T] int64
                          at::Tensor& query,            // [T, Hq*hd] or [T, Hq, hd]
                          const std::optional<at::Tensor>& key,  // [T, Hk*hd] or [T, Hk, hd]
                          int64_t head_size,
                          const at::Tensor& cos_sin_cache,  // [max_pos, rot_dim]
                          bool is_neox);
void reshape_and_cache_cpu(const at::Tensor& key,      // [T, Hk, hd]
                           const at::Tensor& value,    // [T, Hk, hd]
                           at::Tensor& key_cache,      // [num_blocks, block_size, Hk, hd]
                           at::Tensor& value_cache,    // [num_blocks, block_size, Hk, hd]
                           const at::Tensor& slot_mapping,  // [T] int64, -1 = skip
                           double k_scale, double v_scale);  // fp8 caches: store key / k_scale
void paged_attention_cpu(at::Tensor& out,                    // [T, Hq, hd]
                         const at::Tensor& query,            // [T, Hq, hd]
                         const at::Tensor& key_cache,        // [num_blocks, block_size, Hk, hd]
                         const at::Tensor& value_cache,      // [num_blocks, block_size, Hk, hd]
                         const at::Tensor& query_start_loc,  // [S+1] int32
                         const at::Tensor& seq_lens,         // [S] int32
                         const at::Tensor& block_table,      // [S, max_blocks] int32
                         double scale, int64_t sliding_window, double soft_cap,
                         const std::optional<at::Tensor>& alibi_slopes,  // [Hq] float32
                         double k_scale, double v_scale);  // fp8 caches: K = stored * k_scale

// MLA over the paged latent cache: keys are all L+R columns, values the first L
void mla_paged_attention_cpu(at::Tensor& out,                    // [T, H, L]
                             const at::Tensor& q,                // [T, H, L+R]
                             const at::Tensor& kv_cache,         // [num_blocks, block_size, L+R]
                             const at::Tensor& query_start_loc,  // [S+1] int32
                             const at::Tensor& seq_lens,         // [S] int32
                             const at::Tensor& block_table,      // [S, max_blocks] int32
                             double scale, int64_t kv_lora_rank);

void topk_routing_cpu(at::Tensor& topk_weights,        // [T, k] float32
                      at::Tensor& topk_ids,            // [T, k] int32
                      const at::Tensor& gating_output,  // [T, E] router logits
                      const std::string& scoring,       // "softmax" | "sigmoid"
                      bool renormalize,
                      const std::optional<at::Tensor>& bias,  // [E] choice-only score bias
                      int64_t n_group, int64_t topk_group,
                      const std::string& group_score,   // "max" | "top2_sum"
                      double routed_scaling_factor);
void moe_align_cpu(at::Tensor& sorted_token_ids,     // [P] int32 pairs grouped by expert, padded
                   at::Tensor& expert_ids,           // [P / block_size] int32, -1 = unused tile
                   at::Tensor& num_tokens_post_pad,  // [1] int32
                   const at::Tensor& topk_ids,       // [T, k] int32
                   int64_t num_experts, int64_t block_size);
void fused_moe_cpu(at::Tensor& out,                // [T, H]
                   const at::Tensor& hidden,       // [T, H]
                   const at::Tensor& w13,          // [E, 2I, H] gate rows, then up rows
                   const at::Tensor& w2,           // [E, H, I]
                   const at::Tensor& topk_weights,  // [T, k] float32
                   const at::Tensor& topk_ids,     // [T, k] int32
                   const std::string& activation);  // "silu" | "gelu" | "gelu_tanh"
void fused_moe_packed_cpu(at::Tensor& out,                 // [T, H]
                          const at::Tensor& hidden,        // [T, H]
                          const at::Tensor& w13_packed,    // [E, ceil(I/64), 2, ceil(H/2), 64, 2]
                          const at::Tensor& w2_packed,     // [E, ceil(H/64), ceil(I/2), 64, 2]
                          const at::Tensor& topk_weights,  // [T, k] float32
                          const at::Tensor& topk_ids,      // [T, k] int32
                          int64_t inter_size, const std::string& activation);
void fused_moe_fp8_packed_cpu(at::Tensor& out,                 // [T, H]
                              const at::Tensor& hidden,        // [T, H]
                              const at::Tensor& w13_packed,    // e4m3 [E, ceil(I/64), 2, ceil(H/2), 64, 2]
                              const at::Tensor& w2_packed,     // e4m3 [E, ceil(H/64), ceil(I/2), 64, 2]
                              const at::Tensor& w13_scale,     // [E, ceil(I/64), 2, ceil(H/block_k13), 64] f32
                              const at::Tensor& w2_scale,      // [E, ceil(H/64), ceil(I/block_k2), 64] f32
                              const at::Tensor& topk_weights,  // [T, k] float32
                              const at::Tensor& topk_ids,      // [T, k] int32
                              int64_t inter_size, int64_t block_k13, int64_t block_k2,
                              const std::string& activation);
void fused_moe_fp8_cpu(at::Tensor& out,                 // [T, H]
                       const at::Tensor& hidden,        // [T, H]
                       const at::Tensor& w13,           // e4m3 [E, 2I, H]
                       const at::Tensor& w2,            // e4m3 [E, H, I]
                       const at::Tensor& w13_scale,     // [E, 2I, ceil(H/block_k13)] f32
                       const at::Tensor& w2_scale,      // [E, H, ceil(I/block_k2)] f32
                       const at::Tensor& topk_weights,  // [T, k] float32
                       const at::Tensor& topk_ids,      // [T, k] int32
                       int64_t block_k13, int64_t block_k2, const std::string& activation);
void fused_moe_int4_packed_cpu(at::Tensor& out,                        // [T, H]
                               const at::Tensor& hidden,               // [T, H]
                               const at::Tensor& w13_packed,           // uint8 [E, 2*ceil(I/32), ceil(H/2), 32]
                               const at::Tensor& w2_packed,            // uint8 [E, ceil(H/32), ceil(I/2), 32]
                               const at::Tensor& w13_scales_offsets,   // f32 [E, 2*ceil(I/32), G13, 2, 32]
                               const at::Tensor& w2_scales_offsets,    // f32 [E, ceil(H/32), G2, 2, 32]
                               const at::Tensor& topk_weights,         // [T, k] float32
                               const at::Tensor& topk_ids,             // [T, k] int32
                               int64_t inter_size, int64_t group_size,  // group_size -1: per channel
                               const std::string& activation,
                               const std::optional<at::Tensor>& w13_perm);  // int32 [E, H] act order
void fused_moe_int8_packed_cpu(at::Tensor& out,                        // [T, H]
                               const at::Tensor& hidden,               // [T, H]
                               const at::Tensor& w13_packed,           // int8 [E, 2*ceil(I/16), H, 16]
                               const at::Tensor& w2_packed,            // int8 [E, ceil(H/16), I, 16]
                               const at::Tensor& w13_scales_offsets,   // f32 [E, 2*ceil(I/16), G13, 2, 16]
                               const at::Tensor& w2_scales_offsets,    // f32 [E, ceil(H/16), G2, 2, 16]
                               const at::Tensor& topk_weights,         // [T, k] float32
                               const at::Tensor& topk_ids,             // [T, k] int32
                               int64_t inter_size, int64_t group_size13,  // -1: per channel
                               int64_t group_size2, const std::string& activation);
void lora_shrink_cpu(at::Tensor& out,            // [T, R] float32
                     const at::Tensor& x,        // [T, K]
                     const at::Tensor& w,        // [L, R, K]
                     const at::Tensor& indices,  // [T] (-1: no adapter)
                     double scale);
void lora_expand_cpu(at::Tensor& out,            // [T, N_total] (adds into columns offset..)
                     const at::Tensor& x,        // [T, R]
                     const at::Tensor& w,        // [L, N, R]
                     const at::Tensor& indices,  // [T] (-1: no adapter)
                     int64_t offset);
// the same on CUDA (csrc/cuda/lora.cu; indices outside [0, L) mean no adapter)
void lora_shrink_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& indices, double scale);
void lora_expand_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& indices, int64_t offset);

// Mamba-1 (csrc/cpu/mamba.cpp; semantics: ops_native's state-space section). Sequence b owns
// rows query_start_loc[b]..[b+1] and state slot state_indices[b] (< 0: padding); slots update in place.
void causal_conv1d_cpu(at::Tensor& out,                 // [T, D]
                       const at::Tensor& x,             // [T, D]
                       const at::Tensor& weight,        // [D, W] float32
                       const std::optional<at::Tensor>& bias,  // [D] float32
                       at::Tensor& conv_states,         // [S, D, W-1] x's dtype
                       const at::Tensor& query_start_loc,  // [B+1] int32
                       const at::Tensor& state_indices,    // [B] int32
                       const std::optional<at::Tensor>& has_initial_state,  // [B] bool
                       bool silu);
void causal_conv1d_update_cpu(at::Tensor& out,          // [B, D]
                              const at::Tensor& x,      // [B, D]
                              at::Tensor& conv_states,  // [S, D, W-1]
                              const at::Tensor& weight,  // [D, W] float32
                              const std::optional<at::Tensor>& bias,  // [D] float32
                              const at::Tensor& state_indices,        // [B] int32
                              bool silu);
void selective_scan_cpu(at::Tensor& out,                // [T, D]
                        const at::Tensor& u,            // [T, D]
                        const at::Tensor& delta,        // [T, D]
                        const at::Tensor& A,            // [D, N] float32
                        const at::Tensor& B,            // [T, N]
                        const at::Tensor& C,            // [T, N]
                        const std::optional<at::Tensor>& D_skip,      // [D] float32
                        const std::optional<at::Tensor>& z,           // [T, D]
                        const std::optional<at::Tensor>& delta_bias,  // [D] float32
                        bool delta_softplus,
                        at::Tensor& ssm_states,         // [S, D, N] (any float dtype)
                        const at::Tensor& query_start_loc,  // [B+1] int32
                        const at::Tensor& state_indices,    // [B] int32
                        const std::optional<at::Tensor>& has_initial_state);  // [B] bool
void selective_state_update_cpu(at::Tensor& out,        // [B, D]
                                at::Tensor& ssm_states,  // [S, D, N]
                                const at::Tensor& x,     // [B, D]
                                const at::Tensor& dt,    // [B, D]
                                const at::Tensor& A,     // [D, N] float32
                                const at::Tensor& B,     // [B, N]
                                const at::Tensor& C,     // [B, N]
                                const std::optional<at::Tensor>& D_skip,   // [D] float32
                                const std::optional<at::Tensor>& z,        // [B, D]
                                const std::optional<at::Tensor>& dt_bias,  // [D] float32
                                bool dt_softplus,
                                const at::Tensor& state_indices);  // [B] int32

// Mamba-2 SSD: h = exp(dt' A) h + dt' x outer B; y = h C + D x, per (sequence, head);
// ssm_states [S, H, P, N] slots read (has_initial_state) and written in place
void ssd_chunk_scan_cpu(at::Tensor& out,                  // [T, H, P]
                        const at::Tensor& x,              // [T, H, P]
                        const at::Tensor& dt,             // [T, H]
                        const at::Tensor& A,              // [H] float32
                        const at::Tensor& B,              // [T, G, N]
                        const at::Tensor& C,              // [T, G, N]
                        int64_t chunk_size,
                        const std::optional<at::Tensor>& D_skip,   // [H]
                        const std::optional<at::Tensor>& dt_bias,  // [H]
                        bool dt_softplus, double dt_min, double dt_max,
                        at::Tensor& ssm_states,                     // [S, H, P, N]
                        const at::Tensor& query_start_loc,          // [B+1] int32
                        const at::Tensor& state_indices,            // [B] int32, <0: padding
                        const std::optional<at::Tensor>& has_initial_state);  // [B] bool
void ssd_state_update_cpu(at::Tensor& out, at::Tensor& ssm_states,  // [B, H, P], [S, H, P, N]
                          const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& C,  // [B, G, N]
                          const std::optional<at::Tensor>& D_skip,
                          const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                          double dt_min, double dt_max, const at::Tensor& state_indices);

// Gated delta rule (Kimi-Linear KDA): per (sequence, head) state S [K, V] fp32; decode when
// query_start_loc is None (one token per sequence)
void gated_delta_rule_cpu(at::Tensor& out,                  // [T, H, V]
                          const at::Tensor& q,              // [T, H, K]
                          const at::Tensor& k,              // [T, H, K]
                          const at::Tensor& v,              // [T, H, V]
                          const at::Tensor& g,              // [T, H, K] float32 log-decay
                          const at::Tensor& beta,           // [T, H] float32
                          at::Tensor& ssm_states,           // [S, H, K, V] float32
                          const std::optional<at::Tensor>& query_start_loc,    // [B+1] int32
                          const at::Tensor& state_indices,                     // [B] int32
                          const std::optional<at::Tensor>& has_initial_state,  // [B] bool
                          double scale, bool use_qk_l2norm);
// the same on CUDA (csrc/cuda/gated_delta_rule.cu): a block per (sequence, head, 32 state
// columns); a bad query_start_loc / state_indices entry traps the kernel
void gated_delta_rule_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                           at::Tensor& ssm_states,
                           const std::optional<at::Tensor>& query_start_loc,
                           const at::Tensor& state_indices,
                           const std::optional<at::Tensor>& has_initial_state, double scale,
                           bool use_qk_l2norm);

// Speculative decoding's rejection sampler (octavo.spec_decode.rejection, which states the
// rule): out [B, K+1] int64 = each row's accepted drafts, then one recovered or bonus token,
// then -1; the randomness comes in as uniform and exp_noise
void rejection_sample_cpu(at::Tensor& out,                              // [B, K+1] int64
                          const at::Tensor& draft_token_ids,            // [B, K] int64
                          const at::Tensor& num_draft_tokens,           // [B] int64 in [0, K]
                          const std::optional<at::Tensor>& draft_probs, // [B, K, V] float32
                          const at::Tensor& target_probs,               // [B, K+1, V] float32
                          const at::Tensor& uniform,                    // [B, K] float64
                          const at::Tensor& exp_noise,                  // [B, K+1, V] float32
                          const at::Tensor& greedy);                    // [B] bool
// the same on CUDA (csrc/cuda/rejection.cu): one block per row; a bad num_draft_tokens or
// sampled-row draft id traps the kernel
void rejection_sample_cuda(at::Tensor& out, const at::Tensor& draft_token_ids,
                           const at::Tensor& num_draft_tokens,
                           const std::optional<at::Tensor>& draft_probs,
                           const at::Tensor& target_probs, const at::Tensor& uniform,
                           const at::Tensor& exp_noise, const at::Tensor& greedy);

// ---- CUDA (csrc/cuda/*.cu, Tensor-level wrappers in csrc/cuda/torch_ops_cuda.cpp) ----
void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fp8_gemm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& scale, int64_t block_n, int64_t block_k,
                   const std::optional<at::Tensor>& x_scale,
                   const std::optional<at::Tensor>& bias);  // bf16 / fp16 out
void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                             double eps);
void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& x);
void gelu_and_mul_cuda(at::Tensor& out, const at::Tensor& x, const std::string& approximate);
void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query,
                           const std::optional<at::Tensor>& key, int64_t head_size,
                           const at::Tensor& cos_sin_cache, bool is_neox);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale,
                            double v_scale);
void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                          const at::Tensor& seq_lens, const at::Tensor& block_table, double scale,
                          int64_t sliding_window, double soft_cap,
                          const std::optional<at::Tensor>& alibi_slopes, double k_scale,
                          double v_scale);
void mla_paged_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                              const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                              const at::Tensor& block_table, double scale, int64_t kv_lora_rank);
void topk_routing_cuda(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                       const std::string& scoring, bool renormalize,
                       const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
                       const std::string& group_score, double routed_scaling_factor);
void moe_align_cuda(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                    at::Tensor& num_tokens_post_pad, const at::Tensor& topk_ids,
                    int64_t num_experts, int64_t block_size);
void fused_moe_cuda(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                    const at::Tensor& w2, const at::Tensor& topk_weights,
                    const at::Tensor& topk_ids, const std::string& activation);  // bf16 / fp16
void fused_moe_fp8_cuda(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                        const at::Tensor& w2, const at::Tensor& w13_scale,
                        const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, int64_t block_k13, int64_t block_k2,
                        const std::string& activation);  // bf16 / fp16
void ssd_chunk_scan_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& dt,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                         int64_t chunk_size, const std::optional<at::Tensor>& D_skip,
                         const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                         double dt_min, double dt_max, at::Tensor& ssm_states,
                         const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                         const std::optional<at::Tensor>& has_initial_state);
void ssd_state_update_cuda(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                           const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                           const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                           double dt_min, double dt_max, const at::Tensor& state_indices);

void causal_conv1d_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                        const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                        const std::optional<at::Tensor>& has_initial_state, bool silu);
void causal_conv1d_update_cuda(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_states,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& state_indices, bool silu);
void selective_scan_cuda(at::Tensor& out, const at::Tensor& u, const at::Tensor& delta,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                         const std::optional<at::Tensor>& D_skip, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                         at::Tensor& ssm_states, const at::Tensor& query_start_loc,
                         const at::Tensor& state_indices,
                         const std::optional<at::Tensor>& has_initial_state);
void selective_state_update_cuda(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                                 const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                                 const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                 const at::Tensor& state_indices);

}  // namespace octavo
