// The one registration table: every octavo op's schema (TORCH_LIBRARY(octavo)) and its CPU,
// CUDA and Meta implementations. Outputs are preallocated by octavo.ops and marked Tensor!.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// Meta (fake tensor) kernels: every op only writes preallocated outputs, so nothing to do.
void rms_norm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, double) {}
void fused_add_rms_norm_meta(at::Tensor&, at::Tensor&, const at::Tensor&, double) {}
void linear_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const std::optional<at::Tensor>&) {}
void linear_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&) {}
void pack_linear_panels_meta(at::Tensor&, const at::Tensor&) {}
void pack_int4_panels_meta(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&) {}
void gguf_q4_blocks_meta(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t) {}
void int4_gemm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                    const std::optional<at::Tensor>&) {}
void fp8_gemm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                   int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {}
void int8_gemm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&) {}
void int8_woq_gemm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        int64_t, const std::optional<at::Tensor>&) {}
void silu_and_mul_meta(at::Tensor&, const at::Tensor&) {}
void argmax_rows_meta(at::Tensor&, const at::Tensor&) {}
void gelu_and_mul_meta(at::Tensor&, const at::Tensor&, const std::string&) {}
void rotary_embedding_meta(const at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, const at::Tensor&, bool) {}
void reshape_and_cache_meta(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                            const at::Tensor&, double, double) {}
void paged_attention_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                          double, const std::optional<at::Tensor>&, double, double) {}
void mla_paged_attention_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, double, int64_t) {}
void topk_routing_meta(at::Tensor&, at::Tensor&, const at::Tensor&, const std::string&, bool,
                       const std::optional<at::Tensor>&, int64_t, int64_t, const std::string&,
                       double) {}
void moe_align_meta(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t, int64_t) {}
void fused_moe_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const std::string&) {}
void fused_moe_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, const std::string&) {}
void fused_moe_fp8_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, int64_t, int64_t, const std::string&) {}
void fused_moe_int4_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, int64_t, int64_t, const std::string&,
                                const std::optional<at::Tensor>&) {}
void fused_moe_int8_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, int64_t, int64_t, int64_t, const std::string&) {}
void fused_moe_fp8_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        int64_t, int64_t, const std::string&) {}
void lora_shrink_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      double) {}
void lora_expand_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      int64_t) {}

void causal_conv1d_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool) {}
void causal_conv1d_update_meta(at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const at::Tensor&, bool) {}
void selective_scan_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                         at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {}
void selective_state_update_meta(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const at::Tensor&) {}

void ssd_chunk_scan_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, int64_t,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                         double, double, at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&) {}
void ssd_state_update_meta(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           bool, double, double, const at::Tensor&) {}

void gated_delta_rule_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, double, bool) {}
void rejection_sample_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&) {}

}  // namespace

TORCH_LIBRARY(octavo, m) {
  // octavo.DecoderPlan: the Llama-family decoder stack run from C++ on CPU (csrc/cpu/decoder_plan.cpp)
  octavo::register_decoder_plan(m);
  // out = x / rms(x) * weight, rows of x [T, H]
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  // residual <- x + residual; x <- rms_norm(residual) * weight (both in place)
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()");
  // out [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]); CPU only (small-M decode GEMM)
  m.def("linear(Tensor! out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  // the same with a bf16 weight packed as [ceil(N/64), ceil(K/2), 64, 2] (64-output panels of K pairs)
  m.def("linear_packed(Tensor! out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  // repack a dense weight [N, K] into that layout (load time; ops_native.pack_linear_panels);
  // out may be weight's own memory (N a multiple of 64, K even, contiguous): packed in place
  m.def("pack_linear_panels(Tensor! out, Tensor weight) -> ()");
  // codes uint8 [N, K] + float32 scales / offsets [N, G] -> int4_gemm's layout (load time;
  // ops_native.pack_int4_panels); CPU only
  m.def("pack_int4_panels(Tensor! packed, Tensor! scales_offsets, Tensor qweight, Tensor scales, "
        "Tensor offsets) -> ()");
  // GGUF Q4_0 / Q4_1 blocks [rows, row bytes] -> codes [rows, K], d, m [rows, K/32] (load time;
  // gguf_loader.q4_blocks); CPU only
  m.def("gguf_q4_blocks(Tensor! codes, Tensor! d, Tensor! m, Tensor raw, int ggml_type) -> ()");
  // out [M, N] = x [M, K] @ W^T (+ bias), W = 4-bit codes * scale + offset per group of K,
  // packed by ops_native.pack_int4_panels; CPU, and CUDA (torch_ops_cuda_int_gemm.cpp)
  m.def("int4_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor scales_offsets, int group_size, "
        "Tensor? bias) -> ()");
  // out [M, N] = x [M, K] @ W^T (+ bias), W = e4m3 weight [N, K] * scale [N/block_n, K/block_k];
  // x holds e4m3 codes when x_scale [M] is given (W8A8); CPU only
  m.def("fp8_gemm(Tensor! out, Tensor x, Tensor weight, Tensor scale, int block_n, int block_k, "
        "Tensor? x_scale, Tensor? bias) -> ()");
  // W8A8: out [M, N] = sx sw (xq @ wq^T - azp colsum) (+ bias), x quantized to int8 per token
  // (dynamic, symmetric or asymmetric) or with a static input_scale; wq packed by
  // ops_native.pack_int8_panels; CPU, and CUDA (torch_ops_cuda_int_gemm.cpp)
  m.def("int8_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor w_scales, Tensor w_colsum, "
        "Tensor? input_scale, Tensor? input_zero_point, bool asymmetric, Tensor? bias) -> ()");
  // W8A16: out [M, N] = x [M, K] @ W^T (+ bias), W = int8 codes * scale + offset per group of
  // K, packed by ops_native.pack_int8_woq_panels (CPU and CUDA: groups of whole 16-wide K steps)
  m.def("int8_woq_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor scales_offsets, "
        "int group_size, Tensor? bias) -> ()");
  // out [T, D] = silu(x[:, :D]) * x[:, D:]
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  // out [N] int64 = torch.argmax(x [N, V] float32, dim=-1) (greedy sampling; CPU only)
  m.def("argmax_rows(Tensor! out, Tensor x) -> ()");
  // out [T, D] = gelu(x[:, :D], approximate) * x[:, D:]; approximate: "none" | "tanh"
  m.def("gelu_and_mul(Tensor! out, Tensor x, str approximate) -> ()");
  // rotates the first rot_dim dims of each query/key head in place (neox or GPT-J pairs)
  m.def("rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()");
  // writes key/value [T, Hk, hd] into the paged caches at slot_mapping (-1 skipped); fp8 caches
  // store key / k_scale and value / v_scale (other caches ignore the scales)
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
        "Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()");
  // causal varlen attention of query [T, Hq, hd] over the paged caches (prefill and decode); an
  // fp8 cache's keys are its values times k_scale, its values times v_scale
  m.def("paged_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
        "Tensor query_start_loc, Tensor seq_lens, Tensor block_table, float scale, "
        "int sliding_window, float soft_cap, Tensor? alibi_slopes, float k_scale=1.0, "
        "float v_scale=1.0) -> ()");
  // MLA: causal attention of q [T, H, L+R] over the paged latent cache [N, B, L+R] (keys: all
  // L+R columns, values: the first L) -> out [T, H, L]
  m.def("mla_paged_attention(Tensor! out, Tensor q, Tensor kv_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_table, float scale, int kv_lora_rank) -> ()");
  // MoE router: softmax/sigmoid scores, optional choice-only bias and grouped top-k ->
  // topk_weights [T, k] float32, topk_ids [T, k] int32 (ties: the lower expert id)
  m.def("topk_routing(Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, str scoring, "
        "bool renormalize, Tensor? bias, int n_group, int topk_group, str group_score, "
        "float routed_scaling_factor) -> ()");
  // groups the (token, slot) pairs of topk_ids [T, k] by expert into tiles of block_size rows
  m.def("moe_align(Tensor! sorted_token_ids, Tensor! expert_ids, Tensor! num_tokens_post_pad, "
        "Tensor topk_ids, int num_experts, int block_size) -> ()");
  // out [T, H] = sum_j w[t, j] * w2[e] @ (act(gate_e @ h) * (up_e @ h)), e = topk_ids[t, j]
  m.def("fused_moe(Tensor! out, Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, "
        "Tensor topk_ids, str activation) -> ()");
  // the same on CPU with the expert weights packed once (ops_native.pack_moe_weights)
  m.def("fused_moe_packed(Tensor! out, Tensor hidden, Tensor w13_packed, Tensor w2_packed, "
        "Tensor topk_weights, Tensor topk_ids, int inter_size, str activation) -> ()");
  // the same with e4m3 experts (uint8 codes in those panels) and fp32 scales per output row and
  // block of block_k columns (ops_native.pack_moe_fp8_scales)
  m.def("fused_moe_fp8_packed(Tensor! out, Tensor hidden, Tensor w13_packed, Tensor w2_packed, "
        "Tensor w13_scale, Tensor w2_scale, Tensor topk_weights, Tensor topk_ids, int inter_size, "
        "int block_k13, int block_k2, str activation) -> ()");
  // fused_moe with e4m3 experts as loaded and fp32 scales per output row and K-block
  // (ops_native.fp8_moe_row_scales); the CPU packs them on each call
  m.def("fused_moe_fp8(Tensor! out, Tensor hidden, Tensor w13, Tensor w2, Tensor w13_scale, "
        "Tensor w2_scale, Tensor topk_weights, Tensor topk_ids, int block_k13, int block_k2, "
        "str activation) -> ()");
  // fused_moe with 4-bit experts packed once (ops_native.prepare_moe_int4_weights: each expert's
  // gate / up / down rows in 32-row panels of nibble codes, fp32 scales and offsets per group);
  // w13_perm int32 [E, H]: act-order experts' K order (hidden gathered per expert)
  m.def("fused_moe_int4_packed(Tensor! out, Tensor hidden, Tensor w13_packed, Tensor w2_packed, "
        "Tensor w13_scales_offsets, Tensor w2_scales_offsets, Tensor topk_weights, "
        "Tensor topk_ids, int inter_size, int group_size, str activation, "
        "Tensor? w13_perm=None) -> ()");
  // fused_moe with weight-only int8 experts packed once (ops_native.prepare_moe_int8_weights:
  // each expert's gate / up / down rows in 16-row panels of int8 codes, fp32 scales and offsets
  // per group of K; w13 and w2 may have different group sizes)
  m.def("fused_moe_int8_packed(Tensor! out, Tensor hidden, Tensor w13_packed, Tensor w2_packed, "
        "Tensor w13_scales_offsets, Tensor w2_scales_offsets, Tensor topk_weights, "
        "Tensor topk_ids, int inter_size, int group_size13, int group_size2, str activation) -> ()");
  // LoRA shrink: out [T, R] float32 = scale * w [L, R, K][indices[t]] @ x [T, K][t]; index -1: 0
  m.def("lora_shrink(Tensor! out, Tensor x, Tensor w, Tensor indices, float scale) -> ()");
  // LoRA expand: out[t, offset:offset+N] += w [L, N, R][indices[t]] @ x [T, R][t]; index -1: none
  m.def("lora_expand(Tensor! out, Tensor x, Tensor w, Tensor indices, int offset) -> ()");
  // Mamba-1 causal depthwise conv over varlen sequences [T, D] preceded by their conv state
  // slots [S, D, W-1] (updated in place); silu: apply silu. Weight [D, W] / bias float32.
  m.def("causal_conv1d(Tensor! out, Tensor x, Tensor weight, Tensor? bias, Tensor! conv_states, "
        "Tensor query_start_loc, Tensor state_indices, Tensor? has_initial_state, bool silu) -> ()");
  // one decode token per sequence: x [B, D]
  m.def("causal_conv1d_update(Tensor! out, Tensor x, Tensor! conv_states, Tensor weight, "
        "Tensor? bias, Tensor state_indices, bool silu) -> ()");
  // Mamba-1 selective scan: h = exp(dt A) h + dt u B[t]; out = (h C[t] + D u) * silu(z)
  m.def("selective_scan(Tensor! out, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D_skip, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor! ssm_states, "
        "Tensor query_start_loc, Tensor state_indices, Tensor? has_initial_state) -> ()");
  // one decode step of selective_scan per sequence: x [B, D]
  m.def("selective_state_update(Tensor! out, Tensor! ssm_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, Tensor? D_skip, Tensor? z, Tensor? dt_bias, bool dt_softplus, "
        "Tensor state_indices) -> ()");
  // Mamba-2 SSD scan over varlen sequences x [T, H, P] (B/C [T, G, N]); ssm_states [S, H, P, N]
  // slots read when has_initial_state and written in place; dt' = clamp(softplus?(dt + dt_bias))
  m.def("ssd_chunk_scan(Tensor! out, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "int chunk_size, Tensor? D_skip, Tensor? dt_bias, bool dt_softplus, float dt_min, "
        "float dt_max, Tensor! ssm_states, Tensor query_start_loc, Tensor state_indices, "
        "Tensor? has_initial_state) -> ()");
  // the one-token decode step of the same recurrence: x [B, H, P] -> out [B, H, P]
  m.def("ssd_state_update(Tensor! out, Tensor! ssm_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, Tensor? D_skip, Tensor? dt_bias, bool dt_softplus, float dt_min, "
        "float dt_max, Tensor state_indices) -> ()");
  // gated delta rule (Kimi-Linear KDA) over varlen sequences, or one token per sequence when
  // query_start_loc is None; ssm_states [S, H, K, V] slots read / written in place
  m.def("gated_delta_rule(Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, "
        "Tensor! ssm_states, Tensor? query_start_loc, Tensor state_indices, "
        "Tensor? has_initial_state, float scale, bool use_qk_l2norm) -> ()");
  // speculative decoding's rejection sampler: out [B, K+1] int64 = accepted drafts, then one
  // recovered or bonus token, then -1 (octavo.spec_decode.rejection states the rule)
  m.def("rejection_sample(Tensor! out, Tensor draft_token_ids, Tensor num_draft_tokens, "
        "Tensor? draft_probs, Tensor target_probs, Tensor uniform, Tensor exp_noise, "
        "Tensor greedy) -> ()");
}

TORCH_LIBRARY_IMPL(octavo, CPU, m) {
  m.impl("rms_norm", &octavo::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &octavo::fused_add_rms_norm_cpu);
  m.impl("linear", &octavo::linear_cpu);
  m.impl("linear_packed", &octavo::linear_packed_cpu);
  m.impl("pack_linear_panels", &octavo::pack_linear_panels_cpu);
  m.impl("pack_int4_panels", &octavo::pack_int4_panels_cpu);
  m.impl("gguf_q4_blocks", &octavo::gguf_q4_blocks_cpu);
  m.impl("int4_gemm", &octavo::int4_gemm_cpu);
  m.impl("int8_gemm", &octavo::int8_gemm_cpu);
  m.impl("int8_woq_gemm", &octavo::int8_woq_gemm_cpu);
  m.impl("fp8_gemm", &octavo::fp8_gemm_cpu);
  m.impl("silu_and_mul", &octavo::silu_and_mul_cpu);
  m.impl("argmax_rows", &octavo::argmax_rows_cpu);
  m.impl("gelu_and_mul", &octavo::gelu_and_mul_cpu);
  m.impl("rotary_embedding", &octavo::rotary_embedding_cpu);
  m.impl("reshape_and_cache", &octavo::reshape_and_cache_cpu);
  m.impl("paged_attention", &octavo::paged_attention_cpu);
  m.impl("mla_paged_attention", &octavo::mla_paged_attention_cpu);
  m.impl("topk_routing", &octavo::topk_routing_cpu);
  m.impl("moe_align", &octavo::moe_align_cpu);
  m.impl("fused_moe", &octavo::fused_moe_cpu);
  m.impl("fused_moe_packed", &octavo::fused_moe_packed_cpu);
  m.impl("fused_moe_fp8_packed", &octavo::fused_moe_fp8_packed_cpu);
  m.impl("fused_moe_fp8", &octavo::fused_moe_fp8_cpu);
  m.impl("fused_moe_int4_packed", &octavo::fused_moe_int4_packed_cpu);
  m.impl("fused_moe_int8_packed", &octavo::fused_moe_int8_packed_cpu);
  m.impl("lora_shrink", &octavo::lora_shrink_cpu);
  m.impl("lora_expand", &octavo::lora_expand_cpu);
  m.impl("causal_conv1d", &octavo::causal_conv1d_cpu);
  m.impl("causal_conv1d_update", &octavo::causal_conv1d_update_cpu);
  m.impl("selective_scan", &octavo::selective_scan_cpu);
  m.impl("selective_state_update", &octavo::selective_state_update_cpu);
  m.impl("ssd_chunk_scan", &octavo::ssd_chunk_scan_cpu);
  m.impl("ssd_state_update", &octavo::ssd_state_update_cpu);
  m.impl("gated_delta_rule", &octavo::gated_delta_rule_cpu);
  m.impl("rejection_sample", &octavo::rejection_sample_cpu);
}

#if defined(OCTAVO_WITH_CUDA)
TORCH_LIBRARY_IMPL(octavo, CUDA, m) {
  m.impl("rms_norm", &octavo::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &octavo::fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &octavo::silu_and_mul_cuda);
  m.impl("gelu_and_mul", &octavo::gelu_and_mul_cuda);
  m.impl("rotary_embedding", &octavo::rotary_embedding_cuda);
  m.impl("reshape_and_cache", &octavo::reshape_and_cache_cuda);
  m.impl("paged_attention", &octavo::paged_attention_cuda);
  m.impl("mla_paged_attention", &octavo::mla_paged_attention_cuda);
  m.impl("topk_routing", &octavo::topk_routing_cuda);
  m.impl("moe_align", &octavo::moe_align_cuda);
  m.impl("fused_moe", &octavo::fused_moe_cuda);
  m.impl("fused_moe_fp8", &octavo::fused_moe_fp8_cuda);
  m.impl("ssd_chunk_scan", &octavo::ssd_chunk_scan_cuda);
  m.impl("ssd_state_update", &octavo::ssd_state_update_cuda);
  m.impl("lora_shrink", &octavo::lora_shrink_cuda);
  m.impl("lora_expand", &octavo::lora_expand_cuda);
  m.impl("rejection_sample", &octavo::rejection_sample_cuda);
  m.impl("gated_delta_rule", &octavo::gated_delta_rule_cuda);
  m.impl("fp8_gemm", &octavo::fp8_gemm_cuda);
  m.impl("causal_conv1d", &octavo::causal_conv1d_cuda);
  m.impl("causal_conv1d_update", &octavo::causal_conv1d_update_cuda);
  m.impl("selective_scan", &octavo::selective_scan_cuda);
  m.impl("selective_state_update", &octavo::selective_state_update_cuda);
}
#endif

TORCH_LIBRARY_IMPL(octavo, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_meta);
  m.impl("linear", &linear_meta);
  m.impl("linear_packed", &linear_packed_meta);
  m.impl("argmax_rows", &argmax_rows_meta);
  m.impl("pack_linear_panels", &pack_linear_panels_meta);
  m.impl("pack_int4_panels", &pack_int4_panels_meta);
  m.impl("gguf_q4_blocks", &gguf_q4_blocks_meta);
  m.impl("int4_gemm", &int4_gemm_meta);
  m.impl("int8_gemm", &int8_gemm_meta);
  m.impl("int8_woq_gemm", &int8_woq_gemm_meta);
  m.impl("fp8_gemm", &fp8_gemm_meta);
  m.impl("silu_and_mul", &silu_and_mul_meta);
  m.impl("gelu_and_mul", &gelu_and_mul_meta);
  m.impl("rotary_embedding", &rotary_embedding_meta);
  m.impl("reshape_and_cache", &reshape_and_cache_meta);
  m.impl("paged_attention", &paged_attention_meta);
  m.impl("mla_paged_attention", &mla_paged_attention_meta);
  m.impl("topk_routing", &topk_routing_meta);
  m.impl("moe_align", &moe_align_meta);
  m.impl("fused_moe", &fused_moe_meta);
  m.impl("fused_moe_packed", &fused_moe_packed_meta);
  m.impl("fused_moe_fp8_packed", &fused_moe_fp8_packed_meta);
  m.impl("fused_moe_fp8", &fused_moe_fp8_meta);
  m.impl("fused_moe_int4_packed", &fused_moe_int4_packed_meta);
  m.impl("fused_moe_int8_packed", &fused_moe_int8_packed_meta);
  m.impl("lora_shrink", &lora_shrink_meta);
  m.impl("lora_expand", &lora_expand_meta);
  m.impl("causal_conv1d", &causal_conv1d_meta);
  m.impl("causal_conv1d_update", &causal_conv1d_update_meta);
  m.impl("selective_scan", &selective_scan_meta);
  m.impl("selective_state_update", &selective_state_update_meta);
  m.impl("ssd_chunk_scan", &ssd_chunk_scan_meta);
  m.impl("ssd_state_update", &ssd_state_update_meta);
  m.impl("gated_delta_rule", &gated_delta_rule_meta);
  m.impl("rejection_sample", &rejection_sample_meta);
}

// `import octavo._C` loads this library (and so registers the ops); the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "octavo kernels (torch.ops.octavo)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
