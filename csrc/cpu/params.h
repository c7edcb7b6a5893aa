// Plain parameter structs passed from the torch-facing launchers to the per-capability CPU
// kernels (no torch headers here: the kernel translation units are built with -mavx512*).
#pragma once

#include <cstdint>

namespace octavo::cpu {

enum class DType { kFloat32, kBFloat16, kFloat16 };

struct RmsNormParams {
  void* out;              // [T, H], row stride out_stride
  void* x;                // [T, H], row stride x_stride (also written by fused_add_rms_norm)
  void* residual;         // [T, H] or null (fused_add_rms_norm only)
  const void* weight;     // [H]
  int64_t out_stride, x_stride, residual_stride;
  int64_t num_tokens, hidden;
  float eps;
  DType dtype;
};

struct LinearParams {
  void* out;              // [M, N], row stride out_stride
  const void* x;          // [M, K], row stride x_stride
  const void* weight;     // [N, K] contiguous
  const void* bias;       // [N] or null
  int64_t out_stride, x_stride;
  int64_t m, n, k;
  DType dtype;
};

struct ActParams {
  void* out;              // [T, D]
  const void* x;          // [T, 2*D]
  int64_t out_stride, x_stride;
  int64_t num_tokens, d;
  int kind;               // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

struct RotaryParams {
  const int64_t* positions;  // [T]
  void* query;               // [T, Hq, head_size] with strides
  void* key;                 // [T, Hk, head_size] with strides, or null
  const void* cos_sin;       // [max_pos, rot_dim]
  int64_t q_stride_token, q_stride_head, k_stride_token, k_stride_head, cos_sin_stride;
  int64_t num_tokens, max_pos;
  int num_q_heads, num_k_heads, head_size, rot_dim;
  bool is_neox;
  bool cos_sin_is_float;     // else same dtype as query
  DType dtype;
};

struct CacheParams {
  const void* key;           // [T, Hk, hd]
  const void* value;         // [T, Hk, hd]
  void* key_cache;           // [num_blocks, block_size, Hk, hd]
  void* value_cache;         // [num_blocks, block_size, Hk, hd]
  const int64_t* slot_mapping;  // [T]
  int64_t k_stride_token, k_stride_head, v_stride_token, v_stride_head;
  int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  int64_t num_tokens, num_slots;
  int num_kv_heads, head_size, block_size;
  DType dtype;                // of key/value (and of the caches unless cache_fp8)
  bool cache_fp8;             // caches hold fp8 e4m3 bytes (kv_cache_dtype="fp8"): quantize on write
  float k_scale, v_scale;     // fp8 caches store key / k_scale and value / v_scale
  bool* ok;                   // set false if a slot is out of range
};

struct PagedAttentionParams {
  void* out;                      // [T, Hq, hd]
  const void* query;              // [T, Hq, hd]
  const void* key_cache;          // [num_blocks, block_size, Hk, hd]
  const void* value_cache;        // [num_blocks, block_size, Hk, hd]
  const int32_t* query_start_loc;  // [S+1]
  const int32_t* seq_lens;        // [S]
  const int32_t* block_table;     // [S, max_blocks]
  const float* alibi_slopes;      // [Hq] or null
  int64_t q_stride_token, q_stride_head, o_stride_token, o_stride_head;
  int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  int64_t bt_stride;
  int num_seqs, num_heads, num_kv_heads, head_size, block_size;
  float scale, soft_cap;           // scale: times k_scale for fp8 caches
  float out_scale;                // the outputs' factor: v_scale for fp8 caches, else 1
  int sliding_window;
  DType dtype;                    // of query/out (and of the caches unless kv_fp8)
  bool kv_fp8;                    // caches hold fp8 e4m3 bytes, written by reshape_and_cache
};

}  // namespace octavo::cpu
