// Host-side parameter structs and launcher declarations for the CUDA kernels. Plain C++ (no
// torch, no CUDA headers beyond the stream type) so the Tensor-level wrappers and the .cu
// launchers share it.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace octavo::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

struct RmsNormArgs {
  void* out;             // [T, H] (rms_norm) ; null for fused_add_rms_norm
  void* x;               // [T, H]
  void* residual;        // [T, H] or null
  const void* weight;    // [H]
  int64_t out_stride, x_stride, residual_stride;
  int64_t num_tokens, hidden;
  float eps;
  DType dtype;
};

struct ActArgs {
  void* out;             // [T, D]
  const void* x;         // [T, 2*D]
  int64_t out_stride, x_stride;
  int64_t num_tokens, d;
  int kind;              // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

struct RotaryArgs {
  const int64_t* positions;  // [T]
  void* query;               // [T, Hq, head_size] with strides
  void* key;                 // [T, Hk, head_size] with strides, or null
  const void* cos_sin;       // [max_pos, rot_dim]: cos in [:, :rot_dim/2], sin in [:, rot_dim/2:]
  int64_t q_stride_token, q_stride_head, k_stride_token, k_stride_head, cos_sin_stride;
  int64_t num_tokens, max_pos;
  int num_q_heads, num_k_heads, rot_dim;
  bool is_neox;
  bool cos_sin_is_float;     // else the query dtype
  DType dtype;
};

struct CacheArgs {
  const void* key;           // [T, Hk, hd] with strides
  const void* value;         // [T, Hk, hd] with strides
  void* key_cache;           // [num_blocks, block_size, Hk, hd] with strides
  void* value_cache;         // [num_blocks, block_size, Hk, hd] with strides
  const int64_t* slot_mapping;  // [T]; -1 skips the token
  int64_t k_stride_token, k_stride_head, v_stride_token, v_stride_head;
  int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  int64_t num_tokens, num_slots;
  int num_kv_heads, head_size, block_size;
  DType dtype;               // of key and value
  bool cache_fp8;            // caches hold fp8 KV bytes (cuda/fp8_kv.cuh), else dtype
  float k_scale, v_scale;    // fp8 caches store key / k_scale, value / v_scale (fp32 division)
};

struct PagedAttentionArgs {
  void* out;                       // [T, Hq, hd] with strides
  const void* query;               // [T, Hq, hd] with strides
  const void* key_cache;           // [num_blocks, block_size, Hk, hd] with strides
  const void* value_cache;         // [num_blocks, block_size, Hk, hd] with strides
  const int32_t* query_start_loc;  // [S+1]: request s owns query rows [qsl[s], qsl[s+1])
  const int32_t* seq_lens;         // [S]: context length of s, its query rows included (last ones)
  const int32_t* block_table;      // [S, max_blocks], row stride bt_stride
  const float* alibi_slopes;       // [Hq] or null
  float* workspace;                // split-context partials (decode), or null when unused:
                                   // paged_attention_workspace_floats(args) floats
  int64_t q_stride_token, q_stride_head, o_stride_token, o_stride_head;
  int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  int64_t bt_stride;
  int64_t num_tokens;              // T
  int64_t num_cache_blocks;        // num_blocks (block_table entries must be below it)
  int num_seqs, num_heads, num_kv_heads, head_size, block_size, max_blocks;
  float scale, soft_cap;           // scale: times k_scale for an fp8 cache; soft_cap <= 0: off
  int sliding_window;              // <= 0: off; else key j is seen by position p if p-w < j <= p
  DType dtype;                     // of query and out
  bool cache_fp8;                  // caches hold fp8 KV bytes (cuda/fp8_kv.cuh), else dtype
  // 1 / v_scale for an fp8 cache, whose values are stored * v_scale (else 1): the kernels divide
  // by l * inv_v_scale instead of l. Last, so that the fields before keep their offsets and the
  // model-dtype kernels their code (ptxas: the same registers)
  float inv_v_scale;
};

// Each returns false for an unsupported dtype; launch errors are left to cudaGetLastError.
bool launch_rms_norm(const RmsNormArgs& a, cudaStream_t stream);
bool launch_fused_add_rms_norm(const RmsNormArgs& a, cudaStream_t stream);
bool launch_act_and_mul(const ActArgs& a, cudaStream_t stream);
// An out-of-range position or slot traps the kernel (a launch error on the GPU; a RuntimeError
// under the emulator).
bool launch_rotary_embedding(const RotaryArgs& a, cudaStream_t stream);
bool launch_reshape_and_cache(const CacheArgs& a, cudaStream_t stream);
// Floats of split-context workspace the launch needs (0: none); a function of shapes only, so
// the decode path can be captured in a CUDA graph.
int64_t paged_attention_workspace_floats(const PagedAttentionArgs& a);
// A bad query_start_loc / seq_lens / block_table entry traps the kernel.
bool launch_paged_attention(const PagedAttentionArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
