// Tensor checks and launcher arguments of the Mamba-1 kernels, shared by the CUDA wrappers and
// the emulator's CPU wrappers: `dev` is where every tensor must live. Shapes and dtypes only:
// nothing here reads device memory (the decode ops stay graph-capturable).
#pragma once

#include "cuda/mamba_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

using OptTensor = std::optional<at::Tensor>;

// rows x cols with a unit last stride, `like`'s dtype and device
inline void check_mamba_rows(const at::Tensor& t, const at::Tensor& like, int64_t rows,
                             int64_t cols, at::DeviceType dev, const char* op, const char* name) {
  check_2d(t, like, dev, op, name);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be [", rows, ", ",
              cols, "], got ", t.sizes());
}

// contiguous fp32 parameter of the given shape on `like`'s device, or null
inline const float* mamba_f32(const OptTensor& t, at::IntArrayRef shape, const at::Tensor& like,
                              const char* op, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device() == like.device(), op, ": ", name, " must be on ", like.device());
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kFloat && t->is_contiguous(), op, ": ",
              name, " must be contiguous float32 ", shape, ", got ", t->scalar_type(), " ",
              t->sizes());
  return t->data_ptr<float>();
}

inline cuda::MambaBatch mamba_batch(const OptTensor& query_start_loc, const at::Tensor& state_indices,
                                    const OptTensor& has_initial_state, int64_t num_tokens,
                                    const at::Tensor& like, const char* op) {
  auto check_index = [&](const at::Tensor& t, int64_t n, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dt && t.is_contiguous(), op,
                ": ", name, " must be contiguous ", dt, " [", n, "], got ", t.scalar_type(), " ",
                t.sizes());
  };
  const int64_t nseq = state_indices.size(0);
  check_index(state_indices, nseq, at::kInt, "state_indices");
  cuda::MambaBatch b{};
  b.state_indices = state_indices.data_ptr<int32_t>();
  b.num_seqs = nseq;
  b.num_tokens = num_tokens;
  if (query_start_loc) {
    check_index(*query_start_loc, nseq + 1, at::kInt, "query_start_loc");
    b.seq_start = query_start_loc->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(nseq == num_tokens, op, ": one token per sequence: state_indices must be [",
                num_tokens, "], got ", state_indices.sizes());
  }
  if (has_initial_state) {
    check_index(*has_initial_state, nseq, at::kBool, "has_initial_state");
    b.has_initial_state = has_initial_state->data_ptr<bool>();
  }
  return b;
}

inline cuda::CausalConvArgs causal_conv1d(at::Tensor& out, const at::Tensor& x,
                                          const at::Tensor& weight, const OptTensor& bias,
                                          at::Tensor& conv_states, const OptTensor& query_start_loc,
                                          const at::Tensor& state_indices,
                                          const OptTensor& has_initial_state, bool silu,
                                          at::DeviceType dev, const char* op) {
  check_on(x, dev, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, D], got ", x.sizes());
  const int64_t t = x.size(0), d = x.size(1);
  check_mamba_rows(x, x, t, d, dev, op, "x");
  check_mamba_rows(out, x, t, d, dev, op, "out");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d, op, ": weight must be [", d, ", W], got ",
              weight.sizes());
  const int64_t w = weight.size(1);
  TORCH_CHECK(w >= 1 && w <= cuda::kMambaMaxConvWidth, op, ": conv width W must be in [1, ",
              cuda::kMambaMaxConvWidth, "], got ", w);
  TORCH_CHECK(conv_states.device() == x.device() && conv_states.dim() == 3 &&
                  conv_states.size(1) == d && conv_states.size(2) == w - 1 &&
                  conv_states.scalar_type() == x.scalar_type(),
              op, ": conv_states must be [S, ", d, ", ", w - 1, "] of x's dtype on x's device, got ",
              conv_states.scalar_type(), " ", conv_states.sizes());
  cuda::CausalConvArgs a{};
  a.weight = mamba_f32(weight, {d, w}, x, op, "weight");
  a.bias = mamba_f32(bias, {d}, x, op, "bias");
  a.batch = mamba_batch(query_start_loc, state_indices, has_initial_state, t, x, op);
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.conv_states = conv_states.data_ptr();
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.cs_stride_slot = conv_states.stride(0);
  a.cs_stride_d = conv_states.stride(1);
  a.cs_stride_w = conv_states.stride(2);
  a.dim = d;
  a.width = static_cast<int>(w);
  a.silu = silu;
  a.dtype = to_dtype(x, op);
  return a;
}

inline cuda::SelectiveScanArgs selective_scan(
    at::Tensor& out, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const OptTensor& D_skip, const OptTensor& z,
    const OptTensor& delta_bias, bool delta_softplus, at::Tensor& ssm_states,
    const OptTensor& query_start_loc, const at::Tensor& state_indices,
    const OptTensor& has_initial_state, at::DeviceType dev, const char* op) {
  check_on(u, dev, op, "u");
  TORCH_CHECK(u.dim() == 2 && A.dim() == 2, op, ": u must be [T, D] and A [D, N], got ",
              u.sizes(), ", ", A.sizes());
  const int64_t t = u.size(0), d = u.size(1), n = A.size(1);
  TORCH_CHECK(n >= 1 && n <= cuda::kMambaMaxDstate, op, ": state size N must be in [1, ",
              cuda::kMambaMaxDstate, "], got ", n);
  check_mamba_rows(u, u, t, d, dev, op, "u");
  check_mamba_rows(out, u, t, d, dev, op, "out");
  check_mamba_rows(delta, u, t, d, dev, op, "delta");
  if (z) check_mamba_rows(*z, u, t, d, dev, op, "z");
  check_mamba_rows(B, u, t, n, dev, op, "B");
  check_mamba_rows(C, u, t, n, dev, op, "C");
  TORCH_CHECK(ssm_states.device() == u.device() && ssm_states.dim() == 3 &&
                  ssm_states.size(1) == d && ssm_states.size(2) == n,
              op, ": ssm_states must be [S, ", d, ", ", n, "] on u's device, got ",
              ssm_states.sizes());
  cuda::SelectiveScanArgs a{};
  a.A = mamba_f32(A, {d, n}, u, op, "A");
  a.D_skip = mamba_f32(D_skip, {d}, u, op, "D_skip");
  a.delta_bias = mamba_f32(delta_bias, {d}, u, op, "delta_bias");
  a.batch = mamba_batch(query_start_loc, state_indices, has_initial_state, t, u, op);
  a.out = out.data_ptr();
  a.u = u.data_ptr();
  a.delta = delta.data_ptr();
  a.z = z ? z->data_ptr() : nullptr;
  a.B = B.data_ptr();
  a.C = C.data_ptr();
  a.ssm_states = ssm_states.data_ptr();
  a.out_stride = out.stride(0);
  a.u_stride = u.stride(0);
  a.delta_stride = delta.stride(0);
  a.z_stride = z ? z->stride(0) : 0;
  a.b_stride = B.stride(0);
  a.c_stride = C.stride(0);
  a.ss_stride_slot = ssm_states.stride(0);
  a.ss_stride_d = ssm_states.stride(1);
  a.ss_stride_n = ssm_states.stride(2);
  a.dim = d;
  a.dstate = static_cast<int>(n);
  a.delta_softplus = delta_softplus;
  a.dtype = to_dtype(u, op);
  a.state_dtype = to_dtype(ssm_states, op);
  return a;
}

}  // namespace octavo::cuda_args
