// Tensor checks and launcher arguments of the Mamba-2 SSD kernel, shared by the CUDA wrappers and
// the emulator's CPU wrappers: `dev` is where every tensor must live. No host reads of the int32
// metadata (a GPU launch must not sync).
#pragma once

#include "cuda/ssd_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::SsdArgs ssd(at::Tensor& out,                  // [T, H, P]
                         const at::Tensor& x,              // [T, H, P]
                         const at::Tensor& dt,             // [T, H]
                         const at::Tensor& A,              // [H] float32
                         const at::Tensor& B,              // [T, G, N]
                         const at::Tensor& C,              // [T, G, N]
                         const std::optional<at::Tensor>& D_skip,   // [H] float32
                         const std::optional<at::Tensor>& dt_bias,  // [H] float32
                         bool dt_softplus, double dt_min, double dt_max,
                         at::Tensor& ssm_states,                    // [S, H, P, N]
                         const at::Tensor* query_start_loc,         // [B+1] int32 or null
                         const at::Tensor& state_indices,           // [B] int32
                         const std::optional<at::Tensor>& has_initial_state,  // [B] bool
                         const char* op, at::DeviceType dev) {
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &x, &dt, &A, &B, &C, &ssm_states, &state_indices}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.dim() == 3 && dt.dim() == 2 && B.dim() == 3 && A.dim() == 1 && ssm_states.dim() == 4,
              op, ": expected x [T, H, P], dt [T, H], A [H], B/C [T, G, N], ssm_states [S, H, P, N]");
  const int64_t T = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  TORCH_CHECK(dt.size(0) == T && dt.size(1) == H && A.size(0) == H && B.size(0) == T &&
                  C.sizes() == B.sizes() && G > 0 && H % G == 0 && ssm_states.size(1) == H &&
                  ssm_states.size(2) == P && ssm_states.size(3) == N && out.sizes() == x.sizes(),
              op, ": shapes do not match: x ", x.sizes(), ", dt ", dt.sizes(), ", B ", B.sizes(),
              ", C ", C.sizes(), ", ssm_states ", ssm_states.sizes(), ", out ", out.sizes());
  TORCH_CHECK(N <= cuda::kSsdMaxState, op, ": state size ", N, " exceeds ", cuda::kSsdMaxState);
  const cuda::DType dtype = to_dtype(x, op);
  for (const at::Tensor* t : List{&dt, &B, &C, &out})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": x, dt, B, C and out must share a dtype");
  TORCH_CHECK(x.stride(2) == 1 && dt.stride(1) == 1 && B.stride(2) == 1 && C.stride(2) == 1, op,
              ": x, dt, B and C need a unit last stride");
  TORCH_CHECK(out.is_contiguous() && ssm_states.is_contiguous(), op,
              ": out and ssm_states must be contiguous");
  TORCH_CHECK(ssm_states.scalar_type() == at::kFloat || ssm_states.scalar_type() == x.scalar_type(),
              op, ": ssm_states must be float32 or x's dtype");
  TORCH_CHECK(dt_min <= dt_max, op, ": dt_limit must have low <= high");
  auto f32 = [&](const at::Tensor& t, const char* name) {
    check_on(t, dev, op, name);
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.dim() == 1 && t.size(0) == H,
                op, ": ", name, " must be a contiguous float32 [", H, "] tensor");
    return t.data_ptr<float>();
  };
  TORCH_CHECK(state_indices.scalar_type() == at::kInt && state_indices.dim() == 1 &&
                  state_indices.is_contiguous(), op, ": state_indices must be contiguous int32 [B]");
  const int64_t num_seqs = state_indices.size(0);
  cuda::SsdArgs a{};
  if (query_start_loc != nullptr) {
    check_on(*query_start_loc, dev, op, "query_start_loc");
    TORCH_CHECK(query_start_loc->scalar_type() == at::kInt && query_start_loc->is_contiguous() &&
                    query_start_loc->dim() == 1 && query_start_loc->size(0) == num_seqs + 1,
                op, ": query_start_loc must be contiguous int32 [", num_seqs + 1, "]");
    a.query_start_loc = query_start_loc->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(num_seqs == T, op, ": one token per sequence: state_indices must be [", T, "]");
  }
  if (has_initial_state) {
    check_on(*has_initial_state, dev, op, "has_initial_state");
    TORCH_CHECK(has_initial_state->scalar_type() == at::kBool && has_initial_state->is_contiguous() &&
                    has_initial_state->numel() == num_seqs,
                op, ": has_initial_state must be contiguous bool [", num_seqs, "]");
    a.has_initial_state = has_initial_state->data_ptr<bool>();
  }
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.dt = dt.data_ptr();
  a.A = f32(A, "A");
  a.B = B.data_ptr();
  a.C = C.data_ptr();
  a.D = D_skip ? f32(*D_skip, "D_skip") : nullptr;
  a.dt_bias = dt_bias ? f32(*dt_bias, "dt_bias") : nullptr;
  a.states = ssm_states.data_ptr();
  a.state_indices = state_indices.data_ptr<int32_t>();
  a.x_t = x.stride(0);
  a.x_h = x.stride(1);
  a.dt_t = dt.stride(0);
  a.b_t = B.stride(0);
  a.b_g = B.stride(1);
  a.c_t = C.stride(0);
  a.c_g = C.stride(1);
  a.num_seqs = static_cast<int>(num_seqs);
  a.heads = static_cast<int>(H);
  a.head_dim = static_cast<int>(P);
  a.dstate = static_cast<int>(N);
  a.groups = static_cast<int>(G);
  a.dt_softplus = dt_softplus;
  a.state_float = ssm_states.scalar_type() == at::kFloat;
  a.dt_min = static_cast<float>(dt_min);
  a.dt_max = static_cast<float>(dt_max);
  a.dtype = dtype;
  return a;
}

}  // namespace octavo::cuda_args
