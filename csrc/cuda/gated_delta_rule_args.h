// Tensor checks and launcher arguments of the gated delta rule, shared by the CUDA wrapper and
// the emulator's CPU wrapper: `dev` is where every tensor must live. query_start_loc and
// state_indices are not read on the host (that would sync): the kernel checks their entries.
#pragma once

#include "cuda/gated_delta_rule_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::GdrArgs gated_delta_rule(at::Tensor& out,                 // [T, H, V]
                                      const at::Tensor& q,             // [T, H, K]
                                      const at::Tensor& k,             // [T, H, K]
                                      const at::Tensor& v,             // [T, H, V]
                                      const at::Tensor& g,             // [T, H, K] float32
                                      const at::Tensor& beta,          // [T, H] float32
                                      at::Tensor& ssm_states,          // [S, H, K, V] float32
                                      const std::optional<at::Tensor>& query_start_loc,
                                      const at::Tensor& state_indices,  // [B] int32
                                      const std::optional<at::Tensor>& has_initial_state,
                                      double scale, bool use_qk_l2norm, at::DeviceType dev) {
  const char* op = "gated_delta_rule";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &q, &k, &v, &g, &beta, &ssm_states, &state_indices}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == q.device(), op, ": all tensors must be on ", q.device());
  }
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && out.sizes() == v.sizes(),
              op, ": expected q/k [T, H, K], v and out [T, H, V], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), ", ", out.sizes());
  const int64_t T = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  TORCH_CHECK(K >= 1 && K <= cuda::kGdrMaxKeyDim, op, ": the CUDA kernel takes key dims 1..",
              cuda::kGdrMaxKeyDim, ", got ", K);
  TORCH_CHECK(g.dim() == 3 && g.size(0) == T && g.size(1) == H && g.size(2) == K &&
                  g.scalar_type() == at::kFloat,
              op, ": g must be float32 [", T, ", ", H, ", ", K, "] (stride 0 in the last dim for "
              "one gate per head), got ", g.sizes());
  TORCH_CHECK(beta.dim() == 2 && beta.size(0) == T && beta.size(1) == H &&
                  beta.scalar_type() == at::kFloat && (H <= 1 || beta.stride(1) == 1),
              op, ": beta must be float32 [", T, ", ", H, "] with a unit last stride");
  TORCH_CHECK(ssm_states.dim() == 4 && ssm_states.size(1) == H && ssm_states.size(2) == K &&
                  ssm_states.size(3) == V && ssm_states.scalar_type() == at::kFloat &&
                  ssm_states.is_contiguous(),
              op, ": ssm_states must be contiguous float32 [S, ", H, ", ", K, ", ", V, "]");
  for (const at::Tensor* t : List{&k, &v, &out})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v and out dtypes differ");
  for (const at::Tensor* t : List{&q, &k, &v})
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1, op, ": q, k and v need a unit last stride");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(state_indices.scalar_type() == at::kInt && state_indices.dim() == 1 &&
                  state_indices.is_contiguous(),
              op, ": state_indices must be a contiguous 1-D int32 tensor");
  const int64_t num_seqs = state_indices.size(0);
  TORCH_CHECK(num_seqs <= INT32_MAX && H <= 65535, op,
              ": at most 2^31 - 1 sequences and 65535 heads");
  cuda::GdrArgs a{};
  if (query_start_loc.has_value()) {
    const at::Tensor& qsl = *query_start_loc;
    TORCH_CHECK(qsl.device() == q.device() && qsl.scalar_type() == at::kInt &&
                    qsl.is_contiguous() && qsl.dim() == 1 && qsl.size(0) == num_seqs + 1,
                op, ": query_start_loc must be a contiguous int32 [", num_seqs + 1, "] tensor on ",
                q.device());
    a.query_start_loc = qsl.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(num_seqs == T, op, ": one token per sequence: state_indices must be [", T, "]");
  }
  if (has_initial_state.has_value()) {
    TORCH_CHECK(has_initial_state->device() == q.device() &&
                    has_initial_state->scalar_type() == at::kBool &&
                    has_initial_state->is_contiguous() && has_initial_state->numel() == num_seqs,
                op, ": has_initial_state must be a contiguous bool [", num_seqs, "] tensor");
    a.has_initial_state = has_initial_state->data_ptr<bool>();
  }
  a.out = out.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.g = g.data_ptr<float>();
  a.beta = beta.data_ptr<float>();
  a.states = ssm_states.data_ptr<float>();
  a.state_indices = state_indices.data_ptr<int32_t>();
  a.q_t = q.stride(0);
  a.q_h = q.stride(1);
  a.k_t = k.stride(0);
  a.k_h = k.stride(1);
  a.v_t = v.stride(0);
  a.v_h = v.stride(1);
  a.g_t = g.stride(0);
  a.g_h = g.stride(1);
  a.g_k = g.stride(2);
  a.beta_t = beta.stride(0);
  a.num_tokens = T;
  a.num_seqs = num_seqs;
  a.num_slots = ssm_states.size(0);
  a.heads = H;
  a.kdim = K;
  a.vdim = V;
  a.scale = static_cast<float>(scale);
  a.l2norm = use_qk_l2norm;
  a.dtype = to_dtype(q, op);
  return a;
}

}  // namespace octavo::cuda_args
