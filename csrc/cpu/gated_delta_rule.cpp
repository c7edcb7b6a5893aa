// Gated delta rule on CPU (Kimi-Linear's KDA, GDN with a per-head gate): the recurrence over
// varlen sequences (prefill) or one token per sequence (decode), fp32 state slots [S, H, K, V].
// Per (sequence, head) and token: two passes over the state rows, each vectorized over V:
//   pass 1: S[k] *= exp(g[k]); m += k[k] * S[k]       (m = k^T S after the decay)
//   pass 2: S[k] += k[k] * (v - m) * beta; o += q[k] * S[k]
// The chunked (WY) form trades these for small GEMMs, which only win on tensor cores.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct GdrParams {
  void* out;                        // [T, H, V] contiguous, dtype
  const void* q;                    // [T, H, K], strides (q_t, q_h, 1), dtype
  const void* k;                    // [T, H, K], strides (k_t, k_h, 1), dtype
  const void* v;                    // [T, H, V], strides (v_t, v_h, 1), dtype
  const float* g;                   // [T, H, K], strides (g_t, g_h, g_k); g_k = 0: one per head
  const float* beta;                // [T, H], strides (beta_t, 1)
  float* states;                    // [S, H, K, V] contiguous
  const int32_t* query_start_loc;   // [num_seqs + 1], or null: sequence b is row b
  const int32_t* state_indices;     // [num_seqs], negative: padding (output zeros)
  const bool* has_initial_state;    // [num_seqs] or null (all true)
  int64_t q_t, q_h, k_t, k_h, v_t, v_h, g_t, g_h, g_k, beta_t;
  int64_t num_seqs, heads, kdim, vdim;
  float scale;
  bool l2norm;
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

template <typename T>
static void gdr_seq_head(const GdrParams& p, int64_t b, int64_t h, std::vector<float>& buf) {
  const int64_t K = p.kdim, V = p.vdim;
  const int64_t t0 = p.query_start_loc ? p.query_start_loc[b] : b;
  const int64_t t1 = p.query_start_loc ? p.query_start_loc[b + 1] : b + 1;
  T* out = static_cast<T*>(p.out);
  const int64_t slot = p.state_indices[b];
  if (slot < 0) {
    for (int64_t t = t0; t < t1; ++t) std::fill_n(out + (t * p.heads + h) * V, V, from_f<T>(0.f));
    return;
  }
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float* S = p.states + (slot * p.heads + h) * K * V;  // [K, V]
  if (p.has_initial_state != nullptr && !p.has_initial_state[b]) std::fill_n(S, K * V, 0.f);
  buf.resize(2 * K + 3 * V);
  float* qf = buf.data();
  float* kf = qf + K;
  float* vf = kf + K;  // v, then delta in place
  float* m = vf + V;
  float* o = m + V;
  for (int64_t t = t0; t < t1; ++t) {
    const T* qr = q + t * p.q_t + h * p.q_h;
    const T* kr = k + t * p.k_t + h * p.k_h;
    const T* vr = v + t * p.v_t + h * p.v_h;
    float qq = 0.f, kk = 0.f;
    for (int64_t i = 0; i < K; ++i) {
      qf[i] = to_f(qr[i]);
      kf[i] = to_f(kr[i]);
      qq += qf[i] * qf[i];
      kk += kf[i] * kf[i];
    }
    // FLA's l2norm: x / sqrt(sum x^2 + 1e-6)
    const float qs = p.scale * (p.l2norm ? 1.f / std::sqrt(qq + 1e-6f) : 1.f);
    const float ks = p.l2norm ? 1.f / std::sqrt(kk + 1e-6f) : 1.f;
    for (int64_t i = 0; i < K; ++i) qf[i] *= qs, kf[i] *= ks;
    for (int64_t j = 0; j < V; ++j) vf[j] = to_f(vr[j]), m[j] = 0.f, o[j] = 0.f;
    const float* gr = p.g + t * p.g_t + h * p.g_h;
    for (int64_t i = 0; i < K; ++i) {  // pass 1
      const float ev = std::exp(gr[i * p.g_k]);
      const fVec e(ev), kv(kf[i]);
      float* row = S + i * V;
      int64_t j = 0;
      for (; j + kVec <= V; j += kVec) {
        const fVec s = fVec::loadu(row + j) * e;
        s.store(row + j);
        at::vec::fmadd(kv, s, fVec::loadu(m + j)).store(m + j);
      }
      for (; j < V; ++j) row[j] *= ev, m[j] += kf[i] * row[j];
    }
    const float beta = p.beta[t * p.beta_t + h];
    for (int64_t j = 0; j < V; ++j) vf[j] = (vf[j] - m[j]) * beta;
    for (int64_t i = 0; i < K; ++i) {  // pass 2
      const fVec kv(kf[i]), qv(qf[i]);
      float* row = S + i * V;
      int64_t j = 0;
      for (; j + kVec <= V; j += kVec) {
        const fVec s = at::vec::fmadd(kv, fVec::loadu(vf + j), fVec::loadu(row + j));
        s.store(row + j);
        at::vec::fmadd(qv, s, fVec::loadu(o + j)).store(o + j);
      }
      for (; j < V; ++j) row[j] += kf[i] * vf[j], o[j] += qf[i] * row[j];
    }
    T* orow = out + (t * p.heads + h) * V;
    for (int64_t j = 0; j < V; ++j) orow[j] = from_f<T>(o[j]);
  }
}

void gdr_kernel(const GdrParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    at::parallel_for(0, p.num_seqs * p.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t i = begin; i < end; ++i)
        gdr_seq_head<scalar_t>(p, i / p.heads, i % p.heads, buf);
    });
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(gdr_kernel, GdrParams)

namespace octavo {

void gated_delta_rule_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                          at::Tensor& ssm_states,
                          const std::optional<at::Tensor>& query_start_loc,
                          const at::Tensor& state_indices,
                          const std::optional<at::Tensor>& has_initial_state, double scale,
                          bool use_qk_l2norm) {
  const char* op = "gated_delta_rule";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &out, &q, &k, &v, &g, &beta, &ssm_states, &state_indices})
    OCTAVO_CHECK_CPU(*t);
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && out.sizes() == v.sizes(),
              op, ": expected q/k [T, H, K], v and out [T, H, V], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), ", ", out.sizes());
  const int64_t T = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
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
  OCTAVO_CHECK_SAME_DTYPE(q, k);
  OCTAVO_CHECK_SAME_DTYPE(q, v);
  OCTAVO_CHECK_SAME_DTYPE(q, out);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v})
    OCTAVO_CHECK_LAST_CONTIG(*t);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(state_indices.scalar_type() == at::kInt && state_indices.dim() == 1 &&
                  state_indices.is_contiguous(),
              op, ": state_indices must be a contiguous 1-D int32 tensor");
  cpu::GdrParams p{};
  p.num_seqs = state_indices.size(0);
  const int32_t* idx = state_indices.data_ptr<int32_t>();
  for (int64_t b = 0; b < p.num_seqs; ++b)
    TORCH_CHECK(idx[b] < ssm_states.size(0), op, ": state_indices[", b, "] = ", idx[b],
                " is outside the ", ssm_states.size(0), " slots");
  if (query_start_loc) {
    const at::Tensor& qsl = *query_start_loc;
    OCTAVO_CHECK_CPU(qsl);
    TORCH_CHECK(qsl.scalar_type() == at::kInt && qsl.is_contiguous() && qsl.dim() == 1 &&
                    qsl.size(0) == p.num_seqs + 1,
                op, ": query_start_loc must be a contiguous int32 [", p.num_seqs + 1, "] tensor");
    const int32_t* s = qsl.data_ptr<int32_t>();
    for (int64_t b = 0; b < p.num_seqs; ++b)
      TORCH_CHECK(s[b] >= 0 && s[b] <= s[b + 1] && s[b + 1] <= T, op,
                  ": query_start_loc must be non-decreasing within [0, ", T, "]");
    p.query_start_loc = s;
  } else {
    TORCH_CHECK(p.num_seqs == T, op, ": one token per sequence: state_indices must be [", T, "]");
  }
  if (has_initial_state) {
    OCTAVO_CHECK_CPU(*has_initial_state);
    TORCH_CHECK(has_initial_state->scalar_type() == at::kBool &&
                    has_initial_state->is_contiguous() && has_initial_state->numel() == p.num_seqs,
                op, ": has_initial_state must be a contiguous bool [", p.num_seqs, "] tensor");
    p.has_initial_state = has_initial_state->data_ptr<bool>();
  }
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.states = ssm_states.data_ptr<float>();
  p.state_indices = idx;
  p.q_t = q.stride(0);
  p.q_h = q.stride(1);
  p.k_t = k.stride(0);
  p.k_h = k.stride(1);
  p.v_t = v.stride(0);
  p.v_h = v.stride(1);
  p.g_t = g.stride(0);
  p.g_h = g.stride(1);
  p.g_k = g.stride(2);
  p.beta_t = beta.stride(0);
  p.heads = H;
  p.kdim = K;
  p.vdim = V;
  p.scale = static_cast<float>(scale);
  p.l2norm = use_qk_l2norm;
  p.dtype = cpu::to_dtype(q, op);
  if (p.num_seqs == 0 || H == 0 || V == 0) return;
  OCTAVO_CALL_CPU_KERNEL(gdr_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
