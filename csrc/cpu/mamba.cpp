// Mamba-1 on CPU: the causal depthwise conv1d and the selective scan over flat varlen batches
// with per-sequence state slots (prefill chunks and decode rows alike), vectorized over channels.
// Semantics: octavo.ops_native (state-space section); the decode ops are the L = 1 case.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

// Sequence b owns rows [seq_start[b], seq_start[b+1]) (rows b..b+1 when seq_start is null: one
// token per sequence) and state slot state_indices[b] (< 0: padding, output rows zero).
struct SsmBatch {
  const int32_t* seq_start;       // [B+1] or null
  const int32_t* state_indices;   // [B]
  const bool* has_initial_state;  // [B] or null (all true)
  int64_t num_seqs;
};

struct CausalConvParams {
  void* out;                 // [T, D], row stride out_stride
  const void* x;             // [T, D], row stride x_stride
  const float* weight;       // [D, W] contiguous
  const float* bias;         // [D] or null
  void* conv_states;         // [S, D, W-1] (strides), x's dtype
  int64_t out_stride, x_stride, cs_stride_slot, cs_stride_d, cs_stride_w;
  int64_t dim, width;
  bool silu;
  SsmBatch batch;
  DType dtype;
};

struct SelectiveScanParams {
  void* out;                 // [T, D], row stride out_stride
  const void* u;             // [T, D]
  const void* delta;         // [T, D]
  const void* z;             // [T, D] or null
  const void* B;             // [T, N]
  const void* C;             // [T, N]
  const float* A;            // [D, N] contiguous
  const float* D_skip;       // [D] or null
  const float* delta_bias;   // [D] or null
  void* ssm_states;          // [S, D, N] (strides), state_dtype
  int64_t out_stride, u_stride, delta_stride, z_stride, b_stride, c_stride;
  int64_t ss_stride_slot, ss_stride_d, ss_stride_n;
  int64_t dim, dstate;
  bool delta_softplus;
  SsmBatch batch;
  DType dtype, state_dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kMaxConvWidth = 16;  // the launchers check W <= this (models use 2..4)
constexpr int kMaxDstate = 256;    // and N <= this (models use 16..128)

static inline fVec silu_v(const fVec& x) { return x / (fVec(1.f) + x.neg().exp()); }

// torch's softplus (beta 1, threshold 20): x above 20 is returned unchanged
static inline fVec softplus_v(const fVec& x) {
  return fVec::blendv(x.exp().log1p(), x, x > fVec(20.f));
}

template <typename T>
static inline fVec load_n(const T* p, int n) {
  return n == kVec ? load_f(p) : load_f_partial(p, n);
}

template <typename T>
static inline void store_n(T* p, const fVec& v, int n) {
  if (n == kVec) store_f(p, v);
  else store_f_partial(p, v, n);
}

// Reads / writes one element of a state tensor whose dtype is only known at run time.
static inline float state_get(const void* base, int64_t off, DType dt) {
  switch (dt) {
    case DType::kBFloat16: return to_f(static_cast<const c10::BFloat16*>(base)[off]);
    case DType::kFloat16: return to_f(static_cast<const c10::Half*>(base)[off]);
    default: return static_cast<const float*>(base)[off];
  }
}

static inline void state_set(void* base, int64_t off, float v, DType dt) {
  switch (dt) {
    case DType::kBFloat16: static_cast<c10::BFloat16*>(base)[off] = c10::BFloat16(v); break;
    case DType::kFloat16: static_cast<c10::Half*>(base)[off] = c10::Half(v); break;
    default: static_cast<float*>(base)[off] = v; break;
  }
}

static inline void seq_rows(const SsmBatch& b, int64_t s, int64_t& begin, int64_t& end) {
  begin = b.seq_start ? b.seq_start[s] : s;
  end = b.seq_start ? b.seq_start[s + 1] : s + 1;
}

// Runs fn(sequence, first channel, channels) over (sequence, block of kVec channels) items.
template <typename Fn>
static void for_seq_blocks(const SsmBatch& b, int64_t dim, int64_t cost_per_item, Fn fn) {
  const int64_t blocks = (dim + kVec - 1) / kVec;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cost_per_item, 1));
  at::parallel_for(0, b.num_seqs * blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = i / blocks, d0 = (i % blocks) * kVec;
      fn(s, d0, static_cast<int>(std::min<int64_t>(kVec, dim - d0)));
    }
  });
}

template <typename T>
static void zero_rows(T* out, int64_t stride, int64_t begin, int64_t end, int64_t d0, int n) {
  for (int64_t t = begin; t < end; ++t) store_n(out + t * stride + d0, fVec(0.f), n);
}

// hist[j] (j < W-1) holds the W-1 inputs before the current token, oldest first, kVec channels
template <typename T>
static void causal_conv_impl(const CausalConvParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  T* cs = static_cast<T*>(p.conv_states);
  const int w = static_cast<int>(p.width), wm1 = w - 1;
  const int64_t avg_len = p.batch.seq_start && p.batch.num_seqs
                              ? std::max<int64_t>(1, p.batch.seq_start[p.batch.num_seqs] /
                                                         p.batch.num_seqs) : 1;
  for_seq_blocks(p.batch, p.dim, avg_len * w * kVec, [&](int64_t s, int64_t d0, int n) {
    int64_t begin, end;
    seq_rows(p.batch, s, begin, end);
    const int64_t slot = p.batch.state_indices[s];
    if (slot < 0) return zero_rows(out, p.out_stride, begin, end, d0, n);
    if (end == begin) return;
    alignas(64) float tmp[kVec] = {};
    fVec wv[kMaxConvWidth], hist[kMaxConvWidth];
    for (int j = 0; j < w; ++j) {
      for (int c = 0; c < n; ++c) tmp[c] = p.weight[(d0 + c) * w + j];
      wv[j] = fVec::loadu(tmp);
    }
    fVec bias(0.f);
    if (p.bias) bias = load_n(p.bias + d0, n);
    T* st = cs + slot * p.cs_stride_slot + d0 * p.cs_stride_d;
    const bool init = !p.batch.has_initial_state || p.batch.has_initial_state[s];
    for (int j = 0; j < wm1; ++j) {
      for (int c = 0; c < kVec; ++c)
        tmp[c] = init && c < n ? to_f(st[c * p.cs_stride_d + j * p.cs_stride_w]) : 0.f;
      hist[j] = fVec::loadu(tmp);
    }
    for (int64_t t = begin; t < end; ++t) {
      const fVec xv = load_n(x + t * p.x_stride + d0, n);
      fVec acc = at::vec::fmadd(wv[wm1], xv, bias);
      for (int j = 0; j < wm1; ++j) acc = at::vec::fmadd(wv[j], hist[j], acc);
      if (p.silu) acc = silu_v(acc);
      store_n(out + t * p.out_stride + d0, acc, n);
      for (int j = 0; j + 1 < wm1; ++j) hist[j] = hist[j + 1];
      if (wm1 > 0) hist[wm1 - 1] = xv;
    }
    for (int j = 0; j < wm1; ++j) {  // the last W-1 inputs (state columns when L < W-1)
      hist[j].store(tmp);
      for (int c = 0; c < n; ++c) st[c * p.cs_stride_d + j * p.cs_stride_w] = from_f<T>(tmp[c]);
    }
  });
}

// h[k] holds state column k of kVec channels; per token: dt = softplus(delta + bias),
// h = exp(dt A) h + dt u B[t], y = sum_k h[k] C[t, k] + D u, out = y silu(z)
template <typename T>
static void selective_scan_impl(const SelectiveScanParams& p) {
  const T* u = static_cast<const T*>(p.u);
  const T* delta = static_cast<const T*>(p.delta);
  const T* z = static_cast<const T*>(p.z);
  const T* Bm = static_cast<const T*>(p.B);
  const T* Cm = static_cast<const T*>(p.C);
  T* out = static_cast<T*>(p.out);
  const int64_t ns = p.dstate;
  const int64_t avg_len = p.batch.seq_start && p.batch.num_seqs
                              ? std::max<int64_t>(1, p.batch.seq_start[p.batch.num_seqs] /
                                                         p.batch.num_seqs) : 1;
  // one work item costs about L * N vector exps
  for_seq_blocks(p.batch, p.dim, avg_len * ns * kVec * 4, [&](int64_t s, int64_t d0, int n) {
    int64_t begin, end;
    seq_rows(p.batch, s, begin, end);
    const int64_t slot = p.batch.state_indices[s];
    if (slot < 0) return zero_rows(out, p.out_stride, begin, end, d0, n);
    if (end == begin) return;
    // A and h as [N] vectors of kVec channels, B/C rows widened to float
    fVec a[kMaxDstate], h[kMaxDstate];
    float brow[kMaxDstate], crow[kMaxDstate];
    alignas(64) float tmp[kVec] = {};
    const int64_t st0 = slot * p.ss_stride_slot + d0 * p.ss_stride_d;
    const bool init = !p.batch.has_initial_state || p.batch.has_initial_state[s];
    for (int64_t k = 0; k < ns; ++k) {
      for (int c = 0; c < n; ++c) tmp[c] = p.A[(d0 + c) * ns + k];
      a[k] = fVec::loadu(tmp);
      for (int c = 0; c < kVec; ++c)
        tmp[c] = init && c < n
                     ? state_get(p.ssm_states, st0 + c * p.ss_stride_d + k * p.ss_stride_n,
                                 p.state_dtype)
                     : 0.f;
      h[k] = fVec::loadu(tmp);
    }
    const fVec dbias = p.delta_bias ? load_n(p.delta_bias + d0, n) : fVec(0.f);
    const fVec dskip = p.D_skip ? load_n(p.D_skip + d0, n) : fVec(0.f);
    for (int64_t t = begin; t < end; ++t) {
      const fVec uv = load_n(u + t * p.u_stride + d0, n);
      fVec dt = load_n(delta + t * p.delta_stride + d0, n) + dbias;
      if (p.delta_softplus) dt = softplus_v(dt);
      const fVec dtu = dt * uv;
      for (int64_t k = 0; k < ns; ++k) {
        brow[k] = to_f(Bm[t * p.b_stride + k]);
        crow[k] = to_f(Cm[t * p.c_stride + k]);
      }
      fVec y0(0.f), y1(0.f);
      int64_t k = 0;
      for (; k + 1 < ns; k += 2) {  // two independent chains for the FMA latency
        h[k] = at::vec::fmadd((dt * a[k]).exp(), h[k], dtu * fVec(brow[k]));
        h[k + 1] = at::vec::fmadd((dt * a[k + 1]).exp(), h[k + 1], dtu * fVec(brow[k + 1]));
        y0 = at::vec::fmadd(h[k], fVec(crow[k]), y0);
        y1 = at::vec::fmadd(h[k + 1], fVec(crow[k + 1]), y1);
      }
      for (; k < ns; ++k) {
        h[k] = at::vec::fmadd((dt * a[k]).exp(), h[k], dtu * fVec(brow[k]));
        y0 = at::vec::fmadd(h[k], fVec(crow[k]), y0);
      }
      fVec y = at::vec::fmadd(uv, dskip, y0 + y1);
      if (z) y = y * silu_v(load_n(z + t * p.z_stride + d0, n));
      store_n(out + t * p.out_stride + d0, y, n);
    }
    for (int64_t k = 0; k < ns; ++k) {
      h[k].store(tmp);
      for (int c = 0; c < n; ++c)
        state_set(p.ssm_states, st0 + c * p.ss_stride_d + k * p.ss_stride_n, tmp[c],
                  p.state_dtype);
    }
  });
}

void causal_conv_kernel(const CausalConvParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { causal_conv_impl<scalar_t>(p); });
}

// Decode steps (one token per sequence) vectorized over the state columns instead: each
// channel's state row [N] is contiguous, so it is loaded and stored as whole vectors (the
// channel-vectorized scan would transpose it for a single token). N % kVec == 0, unit N stride.
template <typename T, typename S>
static void state_update_impl(const SelectiveScanParams& p) {
  const T* u = static_cast<const T*>(p.u);
  const T* delta = static_cast<const T*>(p.delta);
  const T* z = static_cast<const T*>(p.z);
  const T* Bm = static_cast<const T*>(p.B);
  const T* Cm = static_cast<const T*>(p.C);
  T* out = static_cast<T*>(p.out);
  S* states = static_cast<S*>(p.ssm_states);
  const int64_t ns = p.dstate, nv = ns / kVec;
  for_seq_blocks(p.batch, p.dim, ns * kVec * 4, [&](int64_t s, int64_t d0, int n) {
    const int64_t slot = p.batch.state_indices[s];
    if (slot < 0) return zero_rows(out, p.out_stride, s, s + 1, d0, n);
    fVec bv[kMaxDstate / kVec], cv[kMaxDstate / kVec];
    for (int64_t j = 0; j < nv; ++j) {
      bv[j] = load_f(Bm + s * p.b_stride + j * kVec);
      cv[j] = load_f(Cm + s * p.c_stride + j * kVec);
    }
    const fVec uv = load_n(u + s * p.u_stride + d0, n);
    fVec dt = load_n(delta + s * p.delta_stride + d0, n);
    if (p.delta_bias) dt = dt + load_n(p.delta_bias + d0, n);
    if (p.delta_softplus) dt = softplus_v(dt);
    alignas(64) float dts[kVec], dtus[kVec], ys[kVec];
    dt.store(dts);
    (dt * uv).store(dtus);
    for (int c = 0; c < n; ++c) {
      S* h = states + slot * p.ss_stride_slot + (d0 + c) * p.ss_stride_d;
      const float* a = p.A + (d0 + c) * ns;
      const fVec dtc(dts[c]), dtuc(dtus[c]);
      fVec y(0.f);
      for (int64_t j = 0; j < nv; ++j) {
        const fVec hv = at::vec::fmadd((dtc * fVec::loadu(a + j * kVec)).exp(),
                                       load_f(h + j * kVec), dtuc * bv[j]);
        store_f(h + j * kVec, hv);
        y = at::vec::fmadd(hv, cv[j], y);
      }
      ys[c] = hsum(y);
    }
    fVec y = fVec::loadu(ys);
    if (p.D_skip) y = at::vec::fmadd(uv, load_n(p.D_skip + d0, n), y);
    if (z) y = y * silu_v(load_n(z + s * p.z_stride + d0, n));
    store_n(out + s * p.out_stride + d0, y, n);
  });
}

void selective_scan_kernel(const SelectiveScanParams& p) {
  const bool decode = !p.batch.seq_start && !p.batch.has_initial_state;
  if (decode && p.dstate % kVec == 0 && p.ss_stride_n == 1) {
    OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
      switch (p.state_dtype) {
        case DType::kFloat32: state_update_impl<scalar_t, float>(p); break;
        case DType::kBFloat16: state_update_impl<scalar_t, c10::BFloat16>(p); break;
        case DType::kFloat16: state_update_impl<scalar_t, c10::Half>(p); break;
      }
    });
    return;
  }
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { selective_scan_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(causal_conv_kernel, CausalConvParams)
OCTAVO_DECLARE_CPU_KERNEL(selective_scan_kernel, SelectiveScanParams)

namespace octavo {

namespace {

using OptT = std::optional<at::Tensor>;

// [T, D]-shaped activation with a unit last stride and x's dtype
void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType dt,
                const char* name, const char* op) {
  OCTAVO_CHECK_CPU(t);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name, " must have a unit last stride");
}

// fp32 contiguous parameter of the given shape
const float* f32_param(const OptT& t, at::IntArrayRef shape, const char* name, const char* op) {
  if (!t) return nullptr;
  OCTAVO_CHECK_CPU((*t));
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kFloat && t->is_contiguous(), op,
              ": ", name, " must be contiguous float32 ", shape, ", got ", t->scalar_type(), " ",
              t->sizes());
  return t->data_ptr<float>();
}

// The varlen batch: index dtypes and ranges (free on CPU), monotonic query_start_loc;
// bad values raise ValueError in Python.
cpu::SsmBatch make_batch(const OptT& query_start_loc, const at::Tensor& state_indices,
                         const OptT& has_initial_state, int64_t num_tokens, int64_t num_slots,
                         const char* op) {
  OCTAVO_CHECK_CPU(state_indices);
  TORCH_CHECK_VALUE(state_indices.dim() == 1 && state_indices.scalar_type() == at::kInt &&
                  state_indices.is_contiguous(),
              op, ": state_indices must be contiguous int32 [B], got ",
              state_indices.scalar_type(), " ", state_indices.sizes());
  const int64_t nseq = state_indices.size(0);
  cpu::SsmBatch b{};
  b.num_seqs = nseq;
  b.state_indices = state_indices.data_ptr<int32_t>();
  for (int64_t s = 0; s < nseq; ++s)
    TORCH_CHECK_VALUE(b.state_indices[s] < num_slots, op, ": state_indices[", s, "] = ",
                b.state_indices[s], " is not below the ", num_slots, " state slots");
  if (query_start_loc) {
    const at::Tensor& q = *query_start_loc;
    OCTAVO_CHECK_CPU(q);
    TORCH_CHECK_VALUE(q.dim() == 1 && q.size(0) == nseq + 1 && q.scalar_type() == at::kInt &&
                    q.is_contiguous(),
                op, ": query_start_loc must be contiguous int32 [", nseq + 1, "], got ",
                q.scalar_type(), " ", q.sizes());
    b.seq_start = q.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(b.seq_start[0] == 0 && b.seq_start[nseq] == num_tokens, op,
                ": query_start_loc must run from 0 to the ", num_tokens, " tokens");
    for (int64_t s = 0; s < nseq; ++s)
      TORCH_CHECK_VALUE(b.seq_start[s] <= b.seq_start[s + 1], op, ": query_start_loc must not decrease");
  } else {
    TORCH_CHECK_VALUE(nseq == num_tokens, op, ": one token per sequence: state_indices must be [",
                num_tokens, "], got ", state_indices.sizes());
  }
  if (has_initial_state) {
    const at::Tensor& h = *has_initial_state;
    OCTAVO_CHECK_CPU(h);
    TORCH_CHECK_VALUE(h.dim() == 1 && h.size(0) == nseq && h.scalar_type() == at::kBool &&
                    h.is_contiguous(),
                op, ": has_initial_state must be contiguous bool [", nseq, "], got ",
                h.scalar_type(), " ", h.sizes());
    b.has_initial_state = h.data_ptr<bool>();
  }
  return b;
}

void causal_conv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                 at::Tensor& conv_states, const OptT& query_start_loc,
                 const at::Tensor& state_indices, const OptT& has_initial_state, bool silu,
                 const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, D], got ", x.sizes());
  const int64_t t = x.size(0), d = x.size(1);
  check_rows(x, t, d, x.scalar_type(), "x", op);
  check_rows(out, t, d, x.scalar_type(), "out", op);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d, op, ": weight must be [", d, ", W], got ",
              weight.sizes());
  const int64_t w = weight.size(1);
  TORCH_CHECK(w >= 1 && w <= 16, op, ": conv width W must be in [1, 16], got ", w);
  OCTAVO_CHECK_CPU(conv_states);
  TORCH_CHECK(conv_states.dim() == 3 && conv_states.size(1) == d && conv_states.size(2) == w - 1,
              op, ": conv_states must be [S, ", d, ", ", w - 1, "], got ", conv_states.sizes());
  OCTAVO_CHECK_SAME_DTYPE(conv_states, x);
  cpu::CausalConvParams p{};
  p.weight = f32_param(weight, {d, w}, "weight", op);
  p.bias = f32_param(bias, {d}, "bias", op);
  p.batch = make_batch(query_start_loc, state_indices, has_initial_state, t, conv_states.size(0),
                       op);
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.conv_states = conv_states.data_ptr();
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.cs_stride_slot = conv_states.stride(0);
  p.cs_stride_d = conv_states.stride(1);
  p.cs_stride_w = conv_states.stride(2);
  p.dim = d;
  p.width = w;
  p.silu = silu;
  p.dtype = cpu::to_dtype(x, op);
  if (p.batch.num_seqs == 0 || d == 0) return;
  OCTAVO_CALL_CPU_KERNEL(causal_conv_kernel, p);
}

void selective_scan(at::Tensor& out, const at::Tensor& u, const at::Tensor& delta,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                    const OptT& D_skip, const OptT& z, const OptT& delta_bias, bool softplus,
                    at::Tensor& ssm_states, const OptT& query_start_loc,
                    const at::Tensor& state_indices, const OptT& has_initial_state,
                    const char* op) {
  TORCH_CHECK(u.dim() == 2 && A.dim() == 2, op, ": u must be [T, D] and A [D, N], got ",
              u.sizes(), ", ", A.sizes());
  const int64_t t = u.size(0), d = u.size(1), n = A.size(1);
  const auto dt = u.scalar_type();
  check_rows(u, t, d, dt, "u", op);
  check_rows(out, t, d, dt, "out", op);
  check_rows(delta, t, d, dt, "delta", op);
  if (z) check_rows(*z, t, d, dt, "z", op);
  check_rows(B, t, n, dt, "B", op);
  check_rows(C, t, n, dt, "C", op);
  OCTAVO_CHECK_CPU(ssm_states);
  TORCH_CHECK(n >= 1 && n <= 256, op, ": state size N must be in [1, 256], got ", n);
  TORCH_CHECK(ssm_states.dim() == 3 && ssm_states.size(1) == d && ssm_states.size(2) == n, op,
              ": ssm_states must be [S, ", d, ", ", n, "], got ", ssm_states.sizes());
  cpu::SelectiveScanParams p{};
  p.A = f32_param(A, {d, n}, "A", op);
  p.D_skip = f32_param(D_skip, {d}, "D_skip", op);
  p.delta_bias = f32_param(delta_bias, {d}, "delta_bias", op);
  p.batch = make_batch(query_start_loc, state_indices, has_initial_state, t, ssm_states.size(0),
                       op);
  p.out = out.data_ptr();
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.z = z ? z->data_ptr() : nullptr;
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.ssm_states = ssm_states.data_ptr();
  p.out_stride = out.stride(0);
  p.u_stride = u.stride(0);
  p.delta_stride = delta.stride(0);
  p.z_stride = z ? z->stride(0) : 0;
  p.b_stride = B.stride(0);
  p.c_stride = C.stride(0);
  p.ss_stride_slot = ssm_states.stride(0);
  p.ss_stride_d = ssm_states.stride(1);
  p.ss_stride_n = ssm_states.stride(2);
  p.dim = d;
  p.dstate = n;
  p.delta_softplus = softplus;
  p.dtype = cpu::to_dtype(u, op);
  p.state_dtype = cpu::to_dtype(ssm_states, op);
  if (p.batch.num_seqs == 0 || d == 0) return;
  OCTAVO_CALL_CPU_KERNEL(selective_scan_kernel, p);
}

}  // namespace

void causal_conv1d_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                       const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                       const std::optional<at::Tensor>& has_initial_state, bool silu) {
  causal_conv(out, x, weight, bias, conv_states, query_start_loc, state_indices,
              has_initial_state, silu, "causal_conv1d");
}

void causal_conv1d_update_cpu(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_states,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& state_indices, bool silu) {
  causal_conv(out, x, weight, bias, conv_states, std::nullopt, state_indices, std::nullopt, silu,
              "causal_conv1d_update");
}

void selective_scan_cpu(at::Tensor& out, const at::Tensor& u, const at::Tensor& delta,
                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D_skip,
                        const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        at::Tensor& ssm_states, const at::Tensor& query_start_loc,
                        const at::Tensor& state_indices,
                        const std::optional<at::Tensor>& has_initial_state) {
  selective_scan(out, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, ssm_states,
                 query_start_loc, state_indices, has_initial_state, "selective_scan");
}

void selective_state_update_cpu(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                                const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                                const std::optional<at::Tensor>& z,
                                const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                const at::Tensor& state_indices) {
  selective_scan(out, x, dt, A, B, C, D_skip, z, dt_bias, dt_softplus, ssm_states, std::nullopt,
                 state_indices, std::nullopt, "selective_state_update");
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
