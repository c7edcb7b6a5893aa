// Tensor checks and launcher arguments shared by the CUDA wrappers (torch_ops_cuda.cpp) and the
// emulator's CPU wrappers (simt/torch_ops_simt.cpp): `dev` is where every tensor must live.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "cuda/moe_params.h"
#include "cuda/params.h"

namespace octavo::cuda_args {

inline cuda::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), "; use float32, bfloat16 or float16");
  }
  return cuda::DType::kFloat32;
}

// An fp8 cache's K/V scales (vLLM's k_scale / v_scale), checked for every cache dtype.
inline void check_kv_scales(double k_scale, double v_scale, const char* op) {
  TORCH_CHECK(std::isfinite(k_scale) && k_scale > 0 && std::isfinite(v_scale) && v_scale > 0, op,
              ": k_scale and v_scale must be positive and finite, got ", k_scale, " and ", v_scale);
}

inline void check_on(const at::Tensor& t, at::DeviceType dev, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == dev, op, ": ", name, " must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", t.device());
}

inline void check_2d(const at::Tensor& t, const at::Tensor& like, at::DeviceType dev, const char* op,
                     const char* name) {
  check_on(t, dev, op, name);
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " needs a unit last stride");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " != ", like.scalar_type());
}

inline void check_norm(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w,
                       at::DeviceType dev, const char* op) {
  check_2d(x, x, dev, op, "x");
  check_2d(other, x, dev, op, "out/residual");
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": shape mismatch ", other.sizes(), " vs ", x.sizes());
  TORCH_CHECK(w.device() == x.device() && w.dim() == 1 && w.size(0) == x.size(1) &&
                  w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              op, ": weight must be a contiguous [H] tensor of x's dtype and device");
}

inline cuda::RmsNormArgs rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                                  double eps, at::DeviceType dev) {
  check_norm(x, out, w, dev, "rms_norm");
  return {out.data_ptr(), const_cast<void*>(x.data_ptr()), nullptr, w.data_ptr(), out.stride(0),
          x.stride(0), 0, x.size(0), x.size(1), float(eps), to_dtype(x, "rms_norm")};
}

inline cuda::RmsNormArgs fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w,
                                            double eps, at::DeviceType dev) {
  check_norm(x, residual, w, dev, "fused_add_rms_norm");
  return {nullptr, x.data_ptr(), residual.data_ptr(), w.data_ptr(), 0, x.stride(0),
          residual.stride(0), x.size(0), x.size(1), float(eps), to_dtype(x, "fused_add_rms_norm")};
}

// kind: 0 silu, 1 gelu (erf), 2 gelu (tanh)
inline cuda::ActArgs act_and_mul(at::Tensor& out, const at::Tensor& x, int kind, const char* op,
                                 at::DeviceType dev) {
  check_2d(x, x, dev, op, "x");
  check_2d(out, x, dev, op, "out");
  TORCH_CHECK(x.size(1) % 2 == 0 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2, op,
              ": expected x [T, 2*D] and out [T, D], got ", x.sizes(), " and ", out.sizes());
  return {out.data_ptr(), x.data_ptr(), out.stride(0), x.stride(0), x.size(0), x.size(1) / 2,
          kind, to_dtype(x, op)};
}

inline int gelu_kind(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "none" ? 1 : 2;
}

// Views t ([T, H*hd] or [T, H, hd]) as (token stride, head stride, number of heads).
inline void head_layout(const at::Tensor& t, const at::Tensor& positions, int64_t head_size,
                        const char* name, int64_t& s_tok, int64_t& s_head, int& heads) {
  TORCH_CHECK(t.device() == positions.device(), "rotary_embedding: ", name, " must be on ", positions.device());
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "rotary_embedding: ", name,
              " must be [T, H*head_size] or [T, H, head_size], got ", t.sizes());
  TORCH_CHECK(t.size(0) == positions.size(0), "rotary_embedding: ", name, " has ", t.size(0),
              " tokens, positions has ", positions.size(0));
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "rotary_embedding: ", name, " needs a unit last stride");
  s_tok = t.stride(0);
  if (t.dim() == 2) {
    TORCH_CHECK(t.size(1) % head_size == 0, "rotary_embedding: ", name, " last dim ", t.size(1),
                " is not a multiple of head_size ", head_size);
    heads = static_cast<int>(t.size(1) / head_size);
    s_head = head_size;
  } else {
    TORCH_CHECK(t.size(2) == head_size, "rotary_embedding: ", name, " head dim ", t.size(2),
                " != head_size ", head_size);
    heads = static_cast<int>(t.size(1));
    s_head = t.stride(1);
  }
}

inline cuda::RotaryArgs rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                                         const std::optional<at::Tensor>& key, int64_t head_size,
                                         const at::Tensor& cos_sin, bool is_neox, at::DeviceType dev) {
  check_on(positions, dev, "rotary_embedding", "positions");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "rotary_embedding: positions must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(cos_sin.device() == positions.device() && cos_sin.dim() == 2 &&
                  (cos_sin.size(1) <= 1 || cos_sin.stride(1) == 1),
              "rotary_embedding: cos_sin_cache must be [max_pos, rot_dim] with a unit last stride, on ",
              positions.device());
  const int64_t rot_dim = cos_sin.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size, "rotary_embedding: rot_dim ", rot_dim,
              " must be even and <= head_size ", head_size);
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat || cos_sin.scalar_type() == query.scalar_type(),
              "rotary_embedding: cos_sin_cache must be float32 or the query dtype");
  cuda::RotaryArgs a{};
  a.num_tokens = positions.size(0);
  head_layout(query, positions, head_size, "query", a.q_stride_token, a.q_stride_head, a.num_q_heads);
  if (key.has_value()) {
    TORCH_CHECK(key->scalar_type() == query.scalar_type(), "rotary_embedding: key dtype ",
                key->scalar_type(), " != query dtype ", query.scalar_type());
    head_layout(*key, positions, head_size, "key", a.k_stride_token, a.k_stride_head, a.num_k_heads);
    a.key = key->data_ptr();
  }
  a.positions = positions.data_ptr<int64_t>();
  a.query = query.data_ptr();
  a.cos_sin = cos_sin.data_ptr();
  a.cos_sin_stride = cos_sin.stride(0);
  a.max_pos = cos_sin.size(0);
  a.rot_dim = static_cast<int>(rot_dim);
  a.is_neox = is_neox;
  a.cos_sin_is_float = cos_sin.scalar_type() == at::kFloat;
  a.dtype = to_dtype(query, "rotary_embedding");
  return a;
}

inline cuda::CacheArgs reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                         at::Tensor& key_cache, at::Tensor& value_cache,
                                         const at::Tensor& slot_mapping, double k_scale,
                                         double v_scale, at::DeviceType dev) {
  const char* op = "reshape_and_cache";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&key, &value, &key_cache, &value_cache, &slot_mapping}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == key.device(), op, ": all tensors must be on ", key.device());
  }
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), op,
              ": key/value must be [T, Hk, hd], got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(), op,
              ": caches must be [num_blocks, block_size, Hk, hd], got ", key_cache.sizes(), " and ",
              value_cache.sizes());
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2), op,
              ": cache heads/head size ", key_cache.sizes(), " do not match key ", key.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous [T] int64 tensor");
  // fp8 caches (kv_cache_dtype="fp8") take keys/values of any float dtype, quantized on write
  const bool fp8 = key_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), op, ": value dtype ", value.scalar_type(),
              " != key dtype ", key.scalar_type());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": value_cache dtype ",
              value_cache.scalar_type(), " != key_cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(fp8 || key_cache.scalar_type() == key.scalar_type(), op, ": cache dtype ",
              key_cache.scalar_type(), " != key dtype ", key.scalar_type(),
              " (only float8_e4m3fn caches take another dtype)");
  for (const at::Tensor* t : List{&key, &value, &key_cache, &value_cache})
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1, op, ": tensors must have a unit last stride");
  check_kv_scales(k_scale, v_scale, op);
  // model-dtype caches ignore the scales (their copy never reads them)
  const float ks = static_cast<float>(fp8 ? k_scale : 1.0);
  const float vs = static_cast<float>(fp8 ? v_scale : 1.0);
  return {key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
          slot_mapping.data_ptr<int64_t>(), key.stride(0), key.stride(1), value.stride(0),
          value.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
          value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), key.size(0),
          key_cache.size(0) * key_cache.size(1), static_cast<int>(key.size(1)),
          static_cast<int>(key.size(2)), static_cast<int>(key_cache.size(1)),
          to_dtype(key, op), fp8, ks, vs};
}

// Every check that needs no host read of the int32 metadata (a GPU launch must not sync): the
// kernels check query_start_loc, seq_lens and block_table entries themselves.
inline cuda::PagedAttentionArgs paged_attention(
    at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
    const at::Tensor& block_table, double scale, int64_t sliding_window, double soft_cap,
    const std::optional<at::Tensor>& alibi_slopes, double k_scale, double v_scale,
    at::DeviceType dev) {
  const char* op = "paged_attention";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &query, &key_cache, &value_cache, &query_start_loc,
                                  &seq_lens, &block_table}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == query.device(), op, ": all tensors must be on ", query.device());
  }
  TORCH_CHECK(query.dim() == 3, op, ": query must be [T, Hq, hd], got ", query.sizes());
  const cuda::DType dtype = to_dtype(query, op);
  TORCH_CHECK(out.sizes() == query.sizes(), op, ": out ", out.sizes(), " must match query ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(), op,
              ": caches must be [num_blocks, block_size, Hk, hd], got ", key_cache.sizes(), " and ",
              value_cache.sizes());
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2), head_size = query.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, op, ": cache head size ", key_cache.size(3),
              " != query head size ", head_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": Hq=", num_heads,
              " is not a multiple of Hk=", num_kv_heads);
  TORCH_CHECK(head_size % 8 == 0 && head_size > 0 && head_size <= 256, op,
              ": head size must be a multiple of 8 in [8, 256], got ", head_size);
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), op, ": out dtype ", out.scalar_type(),
              " != query dtype ", query.scalar_type());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": value_cache dtype ",
              value_cache.scalar_type(), " != key_cache dtype ", key_cache.scalar_type());
  // fp8 caches (kv_cache_dtype="fp8") serve queries of any float dtype
  const bool fp8 = key_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || key_cache.scalar_type() == query.scalar_type(), op, ": cache dtype ",
              key_cache.scalar_type(), " != query dtype ", query.scalar_type(),
              " (only float8_e4m3fn caches take another dtype)");
  for (const at::Tensor* t : List{&out, &query, &key_cache, &value_cache})
    TORCH_CHECK(t->stride(-1) == 1, op, ": query/out/caches must have a unit last stride");
  // the kernels read cache rows with 16-byte loads (8-byte ones of 8 fp8 values)
  const int64_t vec = fp8 ? 8 : 16 / query.element_size();
  for (const at::Tensor* t : List{&key_cache, &value_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) % vec == 0 &&
                    t->stride(1) % vec == 0 && t->stride(2) % vec == 0,
                op, ": caches must be 16-byte aligned with strides in multiples of ", vec,
                " elements (use a contiguous cache)");
  for (const at::Tensor* t : List{&query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": query_start_loc, seq_lens and block_table must be int32");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), op, ": seq_lens must be contiguous [S]");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == num_seqs + 1 &&
                  query_start_loc.is_contiguous(),
              op, ": query_start_loc must be contiguous [S+1]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs &&
                  (block_table.size(1) <= 1 || block_table.stride(1) == 1),
              op, ": block_table must be [S, max_blocks] with a unit last stride");
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->device() == query.device() && alibi_slopes->scalar_type() == at::kFloat &&
                    alibi_slopes->numel() == num_heads && alibi_slopes->is_contiguous(),
                op, ": alibi_slopes must be a contiguous float32 [Hq] tensor on ", query.device());
  }
  TORCH_CHECK(sliding_window >= 0 && sliding_window <= INT32_MAX, op, ": sliding_window must be >= 0");
  TORCH_CHECK(soft_cap >= 0, op, ": soft_cap must be >= 0");
  check_kv_scales(k_scale, v_scale, op);
  TORCH_CHECK(query.size(0) <= INT32_MAX, op, ": at most 2^31 - 1 query tokens, got ", query.size(0));
  TORCH_CHECK(key_cache.size(1) > 0, op, ": cache block_size must be > 0");
  TORCH_CHECK(num_seqs <= 65535, op, ": at most 65535 sequences per call (the decode grid's y), got ", num_seqs);
  cuda::PagedAttentionArgs a{};
  a.out = out.data_ptr();
  a.query = query.data_ptr();
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.block_table = block_table.data_ptr<int32_t>();
  a.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  a.q_stride_token = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.o_stride_token = out.stride(0);
  a.o_stride_head = out.stride(1);
  a.kc_stride_block = key_cache.stride(0);
  a.kc_stride_token = key_cache.stride(1);
  a.kc_stride_head = key_cache.stride(2);
  a.vc_stride_block = value_cache.stride(0);
  a.vc_stride_token = value_cache.stride(1);
  a.vc_stride_head = value_cache.stride(2);
  a.bt_stride = block_table.stride(0);
  a.num_tokens = query.size(0);
  a.num_cache_blocks = key_cache.size(0);
  a.num_seqs = static_cast<int>(num_seqs);
  a.num_heads = static_cast<int>(num_heads);
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.head_size = static_cast<int>(head_size);
  a.block_size = static_cast<int>(key_cache.size(1));
  a.max_blocks = static_cast<int>(block_table.size(1));
  // an fp8 cache's K scale multiplies every score (folded into the softmax scale, as on the
  // CPU), its V scale every output (folded into the softmax's normalizer l); other caches ignore
  // both. A reciprocal, so that the kernels multiply (a power-of-two scale stays exact)
  a.scale = static_cast<float>(fp8 ? scale * k_scale : scale);
  a.inv_v_scale = static_cast<float>(fp8 ? 1.0 / v_scale : 1.0);
  a.soft_cap = static_cast<float>(soft_cap);
  a.sliding_window = static_cast<int>(sliding_window);
  a.dtype = dtype;
  a.cache_fp8 = fp8;
  return a;
}

// ---- mixture of experts (no host read of the ids: the kernels skip out-of-range ones) ----

inline cuda::TopkRoutingArgs topk_routing(at::Tensor& topk_weights, at::Tensor& topk_ids,
                                          const at::Tensor& gating, const std::string& scoring,
                                          bool renormalize, const std::optional<at::Tensor>& bias,
                                          int64_t n_group, int64_t topk_group,
                                          const std::string& group_score, double scale,
                                          at::DeviceType dev) {
  const char* op = "topk_routing";
  check_2d(gating, gating, dev, op, "gating_output");
  const int64_t t = gating.size(0), e = gating.size(1), k = topk_ids.size(-1);
  TORCH_CHECK(topk_weights.device() == gating.device() && topk_ids.device() == gating.device(),
              op, ": outputs must be on ", gating.device());
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == t && topk_weights.size(1) == k &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous [T, k] float32 tensor");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == t && topk_ids.scalar_type() == at::kInt &&
                  topk_ids.is_contiguous(), op, ": topk_ids must be a contiguous [T, k] int32 tensor");
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", op, ": scoring must be 'softmax' or "
              "'sigmoid', got '", scoring, "'");
  TORCH_CHECK(group_score == "max" || group_score == "top2_sum", op, ": group_score must be "
              "'max' or 'top2_sum', got '", group_score, "'");
  TORCH_CHECK(n_group >= 1 && n_group <= cuda::kMoeMaxGroupsHost && e % n_group == 0 &&
                  topk_group >= 1 && topk_group <= n_group,
              op, ": n_group must divide E (at most 64 groups) and 1 <= topk_group <= n_group");
  TORCH_CHECK(k >= 1 && k <= (n_group > 1 ? topk_group * (e / n_group) : e), op,
              ": top_k out of range for the experts of the chosen groups");
  TORCH_CHECK(!(n_group > 1 && group_score == "top2_sum" && e / n_group < 2), op,
              ": top2_sum needs 2 experts per group");
  if (bias.has_value())
    TORCH_CHECK(bias->device() == gating.device() && bias->dim() == 1 && bias->size(0) == e &&
                    bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 [E] tensor on ", gating.device());
  cuda::TopkRoutingArgs a{};
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.gating_output = gating.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.gating_stride = gating.stride(0);
  a.num_tokens = t;
  a.num_experts = static_cast<int>(e);
  a.top_k = static_cast<int>(k);
  a.n_group = static_cast<int>(n_group);
  a.topk_group = static_cast<int>(topk_group);
  a.softmax = scoring == "softmax";
  a.renormalize = renormalize;
  a.top2_sum = group_score == "top2_sum";
  a.routed_scaling_factor = static_cast<float>(scale);
  a.dtype = to_dtype(gating, op);
  return a;
}

inline cuda::MoeAlignArgs moe_align(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                                    at::Tensor& num_tokens_post_pad, const at::Tensor& topk_ids,
                                    int64_t num_experts, int64_t block_size, at::DeviceType dev) {
  const char* op = "moe_align";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&sorted_token_ids, &expert_ids, &num_tokens_post_pad, &topk_ids}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == topk_ids.device() && t->scalar_type() == at::kInt && t->is_contiguous(),
                op, ": all tensors must be contiguous int32 on ", topk_ids.device());
  }
  TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be [T, k], got ", topk_ids.sizes());
  TORCH_CHECK(num_experts >= 1 && block_size >= 1 && block_size <= (1 << 20), op,
              ": num_experts and block_size must be positive");
  const int64_t p = cuda::moe_padded_len(topk_ids.numel(), num_experts, block_size);
  TORCH_CHECK(sorted_token_ids.numel() == p && expert_ids.numel() == p / block_size &&
                  num_tokens_post_pad.numel() == 1,
              op, ": outputs must be [", p, "], [", p / block_size, "], [1] (ops_native.moe_align_sizes)");
  TORCH_CHECK(p <= INT32_MAX, op, ": too many (token, expert) pairs");
  return {topk_ids.data_ptr<int32_t>(), sorted_token_ids.data_ptr<int32_t>(),
          expert_ids.data_ptr<int32_t>(), num_tokens_post_pad.data_ptr<int32_t>(),
          topk_ids.numel(), p, static_cast<int>(num_experts), static_cast<int>(block_size)};
}

inline int moe_activation(const std::string& activation) {
  if (activation == "silu") return 0;
  if (activation == "gelu") return 1;
  TORCH_CHECK(activation == "gelu_tanh", "fused_moe: activation must be 'silu', 'gelu' or "
              "'gelu_tanh', got '", activation, "'");
  return 2;
}

// The scratch tensors of one fused_moe call, sized by shapes only (graph capture allocates
// them from the graph's pool).
struct MoeWorkspace {
  at::Tensor sorted_token_ids, expert_ids, num_tokens_post_pad, inter, partial;
};

inline cuda::FusedMoeArgs fused_moe(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                                    const at::Tensor& w2, const at::Tensor& topk_weights,
                                    const at::Tensor& topk_ids, const std::string& activation,
                                    at::DeviceType dev, MoeWorkspace& ws) {
  const char* op = "fused_moe";
  check_2d(hidden, hidden, dev, op, "hidden");
  check_2d(out, hidden, dev, op, "out");
  TORCH_CHECK(out.sizes() == hidden.sizes(), op, ": out ", out.sizes(), " must match hidden ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf, op,
              ": the CUDA kernel takes bfloat16 or float16, got ", hidden.scalar_type());
  const int64_t t = hidden.size(0), h = hidden.size(1);
  for (const at::Tensor* w : {&w13, &w2})
    TORCH_CHECK(w->device() == hidden.device() && w->scalar_type() == hidden.scalar_type() &&
                    w->is_contiguous() && w->dim() == 3,
                op, ": w13 and w2 must be contiguous 3-D tensors of hidden's dtype and device");
  const int64_t e = w13.size(0), i = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == h && w2.size(0) == e && w2.size(1) == h &&
                  w2.size(2) == i,
              op, ": w13 must be [E, 2I, ", h, "] and w2 [E, ", h, ", I], got ", w13.sizes(), " and ", w2.sizes());
  TORCH_CHECK(topk_ids.device() == hidden.device() && topk_ids.dim() == 2 && topk_ids.size(0) == t &&
                  topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              op, ": topk_ids must be a contiguous [T, k] int32 tensor on ", hidden.device());
  TORCH_CHECK(topk_weights.device() == hidden.device() && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous float32 tensor shaped like topk_ids");
  const int64_t k = topk_ids.size(1), n = t * k;
  TORCH_CHECK(e <= 65536 && k >= 1, op, ": at most 65536 experts and top_k >= 1");
  const int64_t p = cuda::moe_padded_len(n, e, cuda::kMoeBlockM);
  TORCH_CHECK(p <= INT32_MAX && p / cuda::kMoeBlockM <= INT32_MAX, op, ": too many pairs");
  const auto i32 = hidden.options().dtype(at::kInt);
  ws.sorted_token_ids = at::empty({p}, i32);
  ws.expert_ids = at::empty({p / cuda::kMoeBlockM}, i32);
  ws.num_tokens_post_pad = at::empty({1}, i32);
  ws.inter = at::empty({p, i}, hidden.options());
  ws.partial = at::empty({n, h}, hidden.options().dtype(at::kFloat));
  cuda::FusedMoeArgs a{};
  a.out = out.data_ptr();
  a.hidden = hidden.data_ptr();
  a.w13 = w13.data_ptr();
  a.w2 = w2.data_ptr();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.sorted_token_ids = ws.sorted_token_ids.data_ptr<int32_t>();
  a.expert_ids = ws.expert_ids.data_ptr<int32_t>();
  a.num_tokens_post_pad = ws.num_tokens_post_pad.data_ptr<int32_t>();
  a.inter = ws.inter.data_ptr();
  a.partial = ws.partial.data_ptr<float>();
  a.out_stride = out.stride(0);
  a.hidden_stride = hidden.stride(0);
  a.num_tokens = t;
  a.hidden_size = h;
  a.inter_size = i;
  a.padded_len = p;
  a.num_experts = static_cast<int>(e);
  a.top_k = static_cast<int>(k);
  a.act = moe_activation(activation);
  a.dtype = to_dtype(hidden, op);
  return a;
}

}  // namespace octavo::cuda_args
