// Mamba-2 SSD on CPU: the prefill scan over varlen sequences (ssd_chunk_scan) and the one-token
// decode step (ssd_state_update), both reading and writing fp32 (or bf16/fp16) state slots.
//
// Why the recurrence and not the chunked SSD form here: per token and head the recurrence does
// 2*P*N multiply-adds on a state that stays in L1 (P*N*4 = 32 KiB at P=64, N=128), while the
// chunked form adds an L*N*L/2 intra-chunk term (chunk L=256: ~3x the work) that only pays off
// where GEMMs run far faster than streaming FMAs (tensor cores). Measured on the 2-core AVX2 EPYC
// (bench/kernels/ssd_scan.py, fp32, one thread, 24 heads of 64 x 128): T=2048 takes 212 ms here
// vs 2020 ms in transformers' chunked einsum form (chunk 256), and decode is one state pass
// either way. chunk_size is accepted and ignored.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct SsdParams {
  void* out;                        // [T, H, P] contiguous, dtype
  const void* x;                    // [T, H, P], strides (x_t, x_h, 1), dtype
  const void* dt;                   // [T, H], strides (dt_t, 1), dtype
  const float* A;                   // [H]
  const void* B;                    // [T, G, N], strides (b_t, b_g, 1), dtype
  const void* C;                    // [T, G, N], strides (c_t, c_g, 1), dtype
  const float* D;                   // [H] or null
  const float* dt_bias;             // [H] or null
  void* states;                     // [S, H, P, N] contiguous, state_dtype
  const int32_t* query_start_loc;   // [num_seqs + 1], or null: sequence b is row b
  const int32_t* state_indices;     // [num_seqs], negative: padding (output zeros)
  const bool* has_initial_state;    // [num_seqs] or null (all true)
  int64_t x_t, x_h, dt_t, b_t, b_g, c_t, c_g;
  int64_t num_seqs, heads, head_dim, dstate, groups;
  bool dt_softplus;
  float dt_min, dt_max;
  DType dtype, state_dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

static inline float ssd_step_dt(float d, const SsdParams& p, int64_t h) {
  if (p.dt_bias) d += p.dt_bias[h];
  if (p.dt_softplus) d = d > 20.f ? d : std::log1p(std::exp(d));  // torch's threshold
  return std::min(std::max(d, p.dt_min), p.dt_max);
}

// R rows of the state [R, N] (row stride N): s = s * dA + dx[r] * B; y[r] = s . C.
// R independent accumulators hide the FMA latency and share the B / C loads.
template <int R>
static inline void ssd_rows(float* s, int64_t n, float dA, const float* dx, const float* B,
                            const float* C, float* y) {
  const fVec vdA(dA);
  fVec vdx[R], acc[R];
  for (int r = 0; r < R; ++r) vdx[r] = fVec(dx[r]), acc[r] = fVec(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const fVec b = fVec::loadu(B + i), c = fVec::loadu(C + i);
    for (int r = 0; r < R; ++r) {
      fVec v = at::vec::fmadd(vdx[r], b, fVec::loadu(s + r * n + i) * vdA);
      v.store(s + r * n + i);
      acc[r] = at::vec::fmadd(v, c, acc[r]);
    }
  }
  if constexpr (R == 4) {
    hsum4(acc, y);
  } else {
    for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]);
  }
  for (; i < n; ++i) {
    for (int r = 0; r < R; ++r) {
      const float v = s[r * n + i] * dA + dx[r] * B[i];
      s[r * n + i] = v;
      y[r] += v * C[i];
    }
  }
}

template <typename T>
static inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

// One (sequence, head): the whole recurrence over the sequence's tokens.
template <typename T, typename S>
static void ssd_seq_head(const SsdParams& p, int64_t b, int64_t h, std::vector<float>& buf) {
  const int64_t P = p.head_dim, N = p.dstate;
  const int64_t t0 = p.query_start_loc ? p.query_start_loc[b] : b;
  const int64_t t1 = p.query_start_loc ? p.query_start_loc[b + 1] : b + 1;
  T* out = static_cast<T*>(p.out);
  const int64_t slot = p.state_indices[b];
  if (slot < 0) {
    for (int64_t t = t0; t < t1; ++t)
      std::fill_n(out + (t * p.heads + h) * P, P, from_f<T>(0.f));
    return;
  }
  const T* x = static_cast<const T*>(p.x);
  const T* dt = static_cast<const T*>(p.dt);
  const T* Bp = static_cast<const T*>(p.B);
  const T* Cp = static_cast<const T*>(p.C);
  const int64_t g = h / (p.heads / p.groups);
  S* slot_state = static_cast<S*>(p.states) + (slot * p.heads + h) * P * N;

  // scratch: state (unless fp32 in place), B row, C row, dt*x row, y row
  buf.resize((std::is_same_v<S, float> ? 0 : P * N) + 2 * N + 2 * P);
  float* st = std::is_same_v<S, float> ? reinterpret_cast<float*>(slot_state) : buf.data();
  float* bf = buf.data() + (std::is_same_v<S, float> ? 0 : P * N);
  float* cf = bf + N;
  float* dx = cf + N;
  float* y = dx + P;
  const bool init = p.has_initial_state == nullptr || p.has_initial_state[b];
  if (!init) {
    std::fill_n(st, P * N, 0.f);
  } else if constexpr (!std::is_same_v<S, float>) {
    to_float(slot_state, st, P * N);
  }
  const float a = p.A[h], dskip = p.D ? p.D[h] : 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const float d = ssd_step_dt(to_f(dt[t * p.dt_t + h]), p, h);
    const float dA = std::exp(d * a);
    const float* brow;
    const float* crow;
    if constexpr (std::is_same_v<T, float>) {
      brow = Bp + t * p.b_t + g * p.b_g;
      crow = Cp + t * p.c_t + g * p.c_g;
    } else {
      to_float(Bp + t * p.b_t + g * p.b_g, bf, N);
      to_float(Cp + t * p.c_t + g * p.c_g, cf, N);
      brow = bf;
      crow = cf;
    }
    const T* xr = x + t * p.x_t + h * p.x_h;
    for (int64_t i = 0; i < P; ++i) dx[i] = d * to_f(xr[i]);
    int64_t i = 0;
    for (; i + 4 <= P; i += 4) ssd_rows<4>(st + i * N, N, dA, dx + i, brow, crow, y + i);
    for (; i < P; ++i) ssd_rows<1>(st + i * N, N, dA, dx + i, brow, crow, y + i);
    T* o = out + (t * p.heads + h) * P;
    for (int64_t j = 0; j < P; ++j) o[j] = from_f<T>(y[j] + dskip * to_f(xr[j]));
  }
  if constexpr (!std::is_same_v<S, float>) {
    for (int64_t j = 0; j < P * N; ++j) slot_state[j] = from_f<S>(st[j]);
  }
}

template <typename T, typename S>
static void ssd_impl(const SsdParams& p) {
  // Work items (sequence, head); a long sequence is one item per head, so two cores stay busy
  // whenever H >= 2.
  at::parallel_for(0, p.num_seqs * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; ++i) ssd_seq_head<T, S>(p, i / p.heads, i % p.heads, buf);
  });
}

void ssd_kernel(const SsdParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    using act_t = scalar_t;
    OCTAVO_CPU_DTYPE_SWITCH(p.state_dtype, [&] { ssd_impl<act_t, scalar_t>(p); });
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(ssd_kernel, SsdParams)

namespace octavo {

namespace {

struct SsdInputs {
  at::Tensor A, D, dt_bias;  // fp32 contiguous copies (D, dt_bias undefined when absent)
};

// Shapes, dtypes, strides; fills everything in p except the sequence layout.
SsdInputs ssd_check_fill(cpu::SsdParams& p, at::Tensor& out, const at::Tensor& x,
                         const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                         const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                         double dt_min, double dt_max, at::Tensor& ssm_states,
                         const at::Tensor& state_indices, const char* op) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &out, &x, &dt, &A, &B, &C, &ssm_states, &state_indices})
    OCTAVO_CHECK_CPU(*t);
  TORCH_CHECK(x.dim() == 3 && dt.dim() == 2 && B.dim() == 3 && C.dim() == 3 && A.dim() == 1 &&
                  ssm_states.dim() == 4,
              op, ": expected x [T, H, P], dt [T, H], A [H], B/C [T, G, N], ssm_states "
              "[S, H, P, N], got ", x.sizes(), ", ", dt.sizes(), ", ", A.sizes(), ", ",
              B.sizes(), ", ", ssm_states.sizes());
  const int64_t T = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  TORCH_CHECK(dt.size(0) == T && dt.size(1) == H && A.size(0) == H && B.size(0) == T &&
                  C.sizes() == B.sizes() && G > 0 && H % G == 0 && ssm_states.size(1) == H &&
                  ssm_states.size(2) == P && ssm_states.size(3) == N && out.sizes() == x.sizes(),
              op, ": shapes do not match: x ", x.sizes(), ", dt ", dt.sizes(), ", B ", B.sizes(),
              ", C ", C.sizes(), ", ssm_states ", ssm_states.sizes(), ", out ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, dt);
  OCTAVO_CHECK_SAME_DTYPE(x, B);
  OCTAVO_CHECK_SAME_DTYPE(x, C);
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &dt, &B, &C})
    OCTAVO_CHECK_LAST_CONTIG(*t);
  TORCH_CHECK(out.is_contiguous() && ssm_states.is_contiguous(), op,
              ": out and ssm_states must be contiguous");
  TORCH_CHECK(state_indices.scalar_type() == at::kInt && state_indices.dim() == 1 &&
                  state_indices.is_contiguous(),
              op, ": state_indices must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(dt_min <= dt_max, op, ": dt_limit must have low <= high");
  const int32_t* idx = state_indices.data_ptr<int32_t>();
  for (int64_t b = 0; b < state_indices.size(0); ++b)
    TORCH_CHECK(idx[b] < ssm_states.size(0), op, ": state_indices[", b, "] = ", idx[b],
                " is outside the ", ssm_states.size(0), " slots");
  SsdInputs in;
  in.A = A.to(at::kFloat).contiguous();
  if (D_skip) {
    TORCH_CHECK(D_skip->dim() == 1 && D_skip->size(0) == H, op, ": D_skip must be [", H, "]");
    in.D = D_skip->to(at::kFloat).contiguous();
  }
  if (dt_bias) {
    TORCH_CHECK(dt_bias->dim() == 1 && dt_bias->size(0) == H, op, ": dt_bias must be [", H, "]");
    in.dt_bias = dt_bias->to(at::kFloat).contiguous();
  }
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.dt = dt.data_ptr();
  p.A = in.A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = in.D.defined() ? in.D.data_ptr<float>() : nullptr;
  p.dt_bias = in.dt_bias.defined() ? in.dt_bias.data_ptr<float>() : nullptr;
  p.states = ssm_states.data_ptr();
  p.state_indices = idx;
  p.x_t = x.stride(0);
  p.x_h = x.stride(1);
  p.dt_t = dt.stride(0);
  p.b_t = B.stride(0);
  p.b_g = B.stride(1);
  p.c_t = C.stride(0);
  p.c_g = C.stride(1);
  p.num_seqs = state_indices.size(0);
  p.heads = H;
  p.head_dim = P;
  p.dstate = N;
  p.groups = G;
  p.dt_softplus = dt_softplus;
  p.dt_min = static_cast<float>(dt_min);
  p.dt_max = static_cast<float>(dt_max);
  p.dtype = cpu::to_dtype(x, op);
  p.state_dtype = cpu::to_dtype(ssm_states, op);
  return in;
}

}  // namespace

void ssd_chunk_scan_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& dt,
                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                        int64_t chunk_size, const std::optional<at::Tensor>& D_skip,
                        const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                        double dt_min, double dt_max, at::Tensor& ssm_states,
                        const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                        const std::optional<at::Tensor>& has_initial_state) {
  const char* op = "ssd_chunk_scan";
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive");
  cpu::SsdParams p{};
  SsdInputs keep = ssd_check_fill(p, out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus, dt_min,
                                  dt_max, ssm_states, state_indices, op);
  OCTAVO_CHECK_CPU(query_start_loc);
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous() &&
                  query_start_loc.dim() == 1 && query_start_loc.size(0) == p.num_seqs + 1,
              op, ": query_start_loc must be a contiguous int32 [", p.num_seqs + 1, "] tensor");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  for (int64_t b = 0; b < p.num_seqs; ++b)
    TORCH_CHECK(qsl[b] >= 0 && qsl[b] <= qsl[b + 1] && qsl[b + 1] <= x.size(0), op,
                ": query_start_loc must be non-decreasing within [0, ", x.size(0), "]");
  p.query_start_loc = qsl;
  if (has_initial_state) {
    OCTAVO_CHECK_CPU(*has_initial_state);
    TORCH_CHECK(has_initial_state->scalar_type() == at::kBool &&
                    has_initial_state->is_contiguous() && has_initial_state->numel() == p.num_seqs,
                op, ": has_initial_state must be a contiguous bool [", p.num_seqs, "] tensor");
    p.has_initial_state = has_initial_state->data_ptr<bool>();
  }
  if (p.num_seqs == 0 || p.head_dim == 0) return;
  OCTAVO_CALL_CPU_KERNEL(ssd_kernel, p);
}

void ssd_state_update_cpu(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                          const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                          const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                          double dt_min, double dt_max, const at::Tensor& state_indices) {
  const char* op = "ssd_state_update";
  cpu::SsdParams p{};
  SsdInputs keep = ssd_check_fill(p, out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus, dt_min,
                                  dt_max, ssm_states, state_indices, op);
  TORCH_CHECK(p.num_seqs == x.size(0), op, ": one token per sequence: state_indices must be [",
              x.size(0), "]");
  if (p.num_seqs == 0 || p.head_dim == 0) return;
  OCTAVO_CALL_CPU_KERNEL(ssd_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
