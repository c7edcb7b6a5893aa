// Speculative decoding's rejection sampler on CPU: one row per OpenMP work item, the argmaxes
// over the vocabulary vectorised. Same result as octavo.spec_decode.rejection for the same noise.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct RejectionParams {
  int64_t* out;                     // [B, K+1] contiguous; -1 after a row's emitted tokens
  const int64_t* draft_token_ids;   // [B, K], row stride draft_stride
  const int64_t* num_draft_tokens;  // [B], each in [0, K]
  const float* draft_probs;         // [B, K, V] with strides (q_stride_b, q_stride_k), or null
  const float* target_probs;        // [B, K+1, V] with strides (p_stride_b, p_stride_k)
  const double* uniform;            // [B, K], row stride u_stride
  const float* exp_noise;           // [B, K+1, V] with strides (n_stride_b, n_stride_k)
  const bool* greedy;               // [B]
  int64_t draft_stride, q_stride_b, q_stride_k, p_stride_b, p_stride_k, u_stride;
  int64_t n_stride_b, n_stride_k;
  int64_t batch, k, vocab;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int64_t kPad = -1;

// torch.argmax's order: a NaN beats every number, otherwise the larger value; ties go to the
// lower index. The vocabulary is scanned in chunks; only the chunk that holds the maximum is
// scanned a second time for its index, so every value is computed (about) once.
template <typename VecAt, typename ScalarAt>
static int64_t argmax(int64_t n, const VecAt& vec_at, const ScalarAt& at) {
  constexpr int64_t kChunk = 16 * kVec;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float best = neg_inf;
  int64_t best_chunk = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    int64_t i = c0;
    fVec m(neg_inf);
    for (; i + kVec <= c1; i += kVec) m = at::vec::maximum(m, vec_at(i));  // NaN propagates
    alignas(64) float lanes[kVec];
    m.store(lanes);
    bool nan = false;
    float cm = neg_inf;
    for (int j = 0; j < kVec; ++j) {
      nan |= std::isnan(lanes[j]);
      cm = lanes[j] > cm ? lanes[j] : cm;
    }
    for (; i < c1; ++i) {
      const float x = at(i);
      nan |= std::isnan(x);
      cm = x > cm ? x : cm;
    }
    if (nan) {  // the first NaN of the row is in this chunk
      for (i = c0; i < c1; ++i)
        if (std::isnan(at(i))) return i;
    }
    if (cm > best) {
      best = cm;
      best_chunk = c0;
    }
  }
  const int64_t c1 = std::min(n, best_chunk + kChunk);
  for (int64_t i = best_chunk; i < c1; ++i)
    if (at(i) == best) return i;
  return best_chunk;  // all values -inf: the first index
}

// max(p - q, 0) as torch.clamp computes it (NaN stays NaN)
static inline float clamp0(float x) { return x < 0.f ? 0.f : x; }
static inline fVec clamp0(const fVec& x) {
  const fVec zero(0.f);
  return fVec::blendv(x, zero, x < zero);
}

// argmax(p / noise): a draw from p (the exponential race)
static int64_t sample(const float* p, const float* noise, int64_t n) {
  return argmax(n, [&](int64_t i) { return fVec::loadu(p + i) / fVec::loadu(noise + i); },
                [&](int64_t i) { return p[i] / noise[i]; });
}

// A draw from max(0, p - q) (q a distribution, or one-hot(d) when q is null); from p when that
// residual is all zero, as the reference does.
static int64_t sample_residual(const float* p, const float* q, int64_t d, const float* noise,
                               int64_t n) {
  // The residual is > 0 or NaN somewhere iff its sum is not <= 0 (the reference's test); its
  // NaN-propagating maximum tells the same.
  fVec rmax(0.f);
  float rmax_s = 0.f;
  auto track = [&](const fVec& r) { rmax = at::vec::maximum(rmax, r); return r; };
  auto track_s = [&](float r) { rmax_s = (std::isnan(r) || r > rmax_s) ? r : rmax_s; return r; };
  int64_t best;
  if (q != nullptr) {
    best = argmax(
        n,
        [&](int64_t i) {
          return track(clamp0(fVec::loadu(p + i) - fVec::loadu(q + i))) / fVec::loadu(noise + i);
        },
        [&](int64_t i) { return track_s(clamp0(p[i] - q[i])) / noise[i]; });
  } else {
    best = argmax(
        n,
        [&](int64_t i) {
          if (d >= i && d < i + kVec) {  // the vector holding the draft token: p[d] - 1 there
            alignas(64) float r[kVec];
            for (int j = 0; j < kVec; ++j) r[j] = clamp0(p[i + j] - (i + j == d ? 1.f : 0.f));
            return track(fVec::loadu(r)) / fVec::loadu(noise + i);
          }
          return track(clamp0(fVec::loadu(p + i))) / fVec::loadu(noise + i);
        },
        [&](int64_t i) { return track_s(clamp0(p[i] - (i == d ? 1.f : 0.f))) / noise[i]; });
  }
  // (the rescan in argmax re-tracks values already seen: harmless for a maximum)
  alignas(64) float lanes[kVec];
  rmax.store(lanes);
  bool positive = std::isnan(rmax_s) || rmax_s > 0.f;
  for (int j = 0; j < kVec; ++j) positive |= std::isnan(lanes[j]) || lanes[j] > 0.f;
  // argmax stops at the first NaN quotient (0 / 0 when a noise draw is 0); the rest of the
  // residual is then unseen. Rare: look at all of it.
  for (int64_t i = 0; !positive && i < n; ++i) {
    const float r = clamp0(p[i] - (q != nullptr ? q[i] : (i == d ? 1.f : 0.f)));
    positive = std::isnan(r) || r > 0.f;
  }
  return positive ? best : sample(p, noise, n);
}

static void rejection_row(const RejectionParams& a, int64_t b) {
  int64_t* out = a.out + b * (a.k + 1);
  const int64_t* drafts = a.draft_token_ids + b * a.draft_stride;
  const int64_t k = a.num_draft_tokens[b];
  const int64_t n = a.vocab;
  int64_t emitted = 0;
  for (int64_t i = 0; i <= k; ++i) {
    const float* p = a.target_probs + b * a.p_stride_b + i * a.p_stride_k;
    const float* noise = a.exp_noise + b * a.n_stride_b + i * a.n_stride_k;
    int64_t token;
    bool stop = true;
    if (a.greedy[b]) {
      token = argmax(n, [&](int64_t j) { return fVec::loadu(p + j); },
                     [&](int64_t j) { return p[j]; });
      stop = i == k || token != drafts[i];
    } else if (i == k) {  // every draft accepted: the bonus token
      token = sample(p, noise, n);
    } else {
      const int64_t d = drafts[i];
      const float* q = a.draft_probs == nullptr
                           ? nullptr
                           : a.draft_probs + b * a.q_stride_b + i * a.q_stride_k;
      const float qd = q == nullptr ? 1.f : q[d];
      // u < p(d) / q(d), compared in double as the reference does
      if (qd > 0.f && a.uniform[b * a.u_stride + i] * double(qd) < double(p[d])) {
        token = d;
        stop = false;
      } else {
        token = sample_residual(p, q, d, noise, n);
      }
    }
    out[emitted++] = token;
    if (stop) break;
  }
  for (int64_t i = emitted; i <= a.k; ++i) out[i] = kPad;
}

void rejection_sample_kernel(const RejectionParams& a) {
  const int64_t work = std::max<int64_t>(1, (a.k + 1) * a.vocab);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) rejection_row(a, b);
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(rejection_sample_kernel, RejectionParams)

namespace octavo {

void rejection_sample_cpu(at::Tensor& out, const at::Tensor& draft_token_ids,
                          const at::Tensor& num_draft_tokens,
                          const std::optional<at::Tensor>& draft_probs,
                          const at::Tensor& target_probs, const at::Tensor& uniform,
                          const at::Tensor& exp_noise, const at::Tensor& greedy) {
  const char* op = "rejection_sample";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &draft_token_ids, &num_draft_tokens, &target_probs,
                                  &uniform, &exp_noise, &greedy})
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong &&
                  (draft_token_ids.size(1) <= 1 || draft_token_ids.stride(1) == 1),
              op, ": draft_token_ids must be int64 [B, K] with a unit last stride");
  TORCH_CHECK(target_probs.dim() == 3, op, ": target_probs must be [B, K+1, V]");
  const int64_t batch = draft_token_ids.size(0), k = draft_token_ids.size(1);
  const int64_t vocab = target_probs.size(2);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({batch, k + 1}) && out.is_contiguous() &&
                  out.scalar_type() == at::kLong,
              op, ": out must be a contiguous int64 [", batch, ", ", k + 1, "] tensor");
  TORCH_CHECK(num_draft_tokens.dim() == 1 && num_draft_tokens.size(0) == batch &&
                  num_draft_tokens.is_contiguous() && num_draft_tokens.scalar_type() == at::kLong,
              op, ": num_draft_tokens must be a contiguous int64 [", batch, "] tensor");
  TORCH_CHECK(greedy.dim() == 1 && greedy.size(0) == batch && greedy.is_contiguous() &&
                  greedy.scalar_type() == at::kBool,
              op, ": greedy must be a contiguous bool [", batch, "] tensor");
  TORCH_CHECK(uniform.dim() == 2 && uniform.size(0) == batch && uniform.size(1) == k &&
                  uniform.scalar_type() == at::kDouble && (k <= 1 || uniform.stride(1) == 1),
              op, ": uniform must be float64 [", batch, ", ", k, "] with a unit last stride");
  for (const at::Tensor* t : {&target_probs, &exp_noise})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == k + 1 &&
                    t->size(2) == vocab && t->scalar_type() == at::kFloat &&
                    (vocab <= 1 || t->stride(2) == 1),
                op, ": target_probs and exp_noise must be float32 [", batch, ", ", k + 1,
                ", V] with a unit last stride, got ", t->sizes());
  TORCH_CHECK(vocab >= 1, op, ": the vocabulary is empty");
  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.size(0) == batch && q.size(1) == k &&
                    q.size(2) == vocab && q.scalar_type() == at::kFloat &&
                    (vocab <= 1 || q.stride(2) == 1),
                op, ": draft_probs must be a float32 CPU [", batch, ", ", k, ", ", vocab,
                "] tensor with a unit last stride, got ", q.sizes());
  }
  const int64_t* nd = num_draft_tokens.data_ptr<int64_t>();
  const int64_t* ids = draft_token_ids.data_ptr<int64_t>();
  const bool* gr = greedy.data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(nd[b] >= 0 && nd[b] <= k, op, ": num_draft_tokens[", b, "] = ", nd[b],
                      " is outside [0, ", k, "]");
    if (gr[b]) continue;  // greedy rows only compare draft ids
    for (int64_t i = 0; i < nd[b]; ++i) {
      const int64_t d = ids[b * draft_token_ids.stride(0) + i];
      TORCH_CHECK_VALUE(d >= 0 && d < vocab, op, ": draft_token_ids[", b, ", ", i, "] = ", d,
                        " is outside the vocabulary [0, ", vocab, ")");
    }
  }
  cpu::RejectionParams p{};
  p.out = out.data_ptr<int64_t>();
  p.draft_token_ids = ids;
  p.num_draft_tokens = nd;
  p.draft_probs = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  p.target_probs = target_probs.data_ptr<float>();
  p.uniform = uniform.data_ptr<double>();
  p.exp_noise = exp_noise.data_ptr<float>();
  p.greedy = gr;
  p.draft_stride = draft_token_ids.stride(0);
  p.q_stride_b = draft_probs.has_value() ? draft_probs->stride(0) : 0;
  p.q_stride_k = draft_probs.has_value() ? draft_probs->stride(1) : 0;
  p.p_stride_b = target_probs.stride(0);
  p.p_stride_k = target_probs.stride(1);
  p.u_stride = uniform.stride(0);
  p.n_stride_b = exp_noise.stride(0);
  p.n_stride_k = exp_noise.stride(1);
  p.batch = batch;
  p.k = k;
  p.vocab = vocab;
  if (batch == 0) return;
  OCTAVO_CALL_CPU_KERNEL(rejection_sample_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
