// Gated activations on CPU: out = act(x[:, :D]) * x[:, D:] for silu and gelu (erf / tanh).
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

enum ActKind { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };

template <int KIND>
static inline fVec act_vec(const fVec& x) {
  if constexpr (KIND == kSilu) {
#if defined(CPU_CAPABILITY_AVX512)
    // x / (1 + exp(-x)) with the reciprocal from rcp14 and one Newton step (a vector division
    // issues once every 16 cycles on Intel cores): -x clamped to 88 keeps 1 + exp(-x) finite,
    // and its reciprocal there (under 2^-126) comes out as 0, as the division's -0 does
    const __m512 d = fVec(1.f) + at::vec::minimum(x.neg(), fVec(88.f)).exp_u20();
    const __m512 r = _mm512_rcp14_ps(d);
    const __m512 rr = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
    return x * fVec(rr);
#else
    return x / (fVec(1.f) + x.neg().exp());
#endif
  } else if constexpr (KIND == kGeluErf) {
    return fVec(0.5f) * x * (fVec(1.f) + (x * fVec(float(M_SQRT1_2))).erf());
  } else {
    const fVec inner = fVec(float(M_2_SQRTPI * M_SQRT1_2)) * (x + fVec(0.044715f) * x * x * x);
    return fVec(0.5f) * x * (fVec(1.f) + inner.tanh());
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// silu for bf16/fp16 results: exp(-x) as 2^t, t = -x log2(e) clamped to [-125, 127], from a
// degree-5 Taylor polynomial of 2^f (f = t - round(t), relative error under 2.4e-6, far below a
// bf16 result's 2^-9) and vscalefps; about half exp_u20's instructions. Below -125 the power is
// 0 (a subnormal scalef takes a microcode assist); at 127 the reciprocal of 1 + 2^t falls under
// FLT_MIN and comes out 0 as above, so very negative x, -inf and NaN give what act_vec gives.
static inline fVec silu_reduced(const fVec& xv) {
  const __m512 x = xv, lo = _mm512_set1_ps(-125.f);
  __m512 t = _mm512_min_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f)), _mm512_set1_ps(127.f));
  const __mmask16 keep = _mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ);
  t = _mm512_max_ps(lo, t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);                    // ln2^5 / 120
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));    // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));    // ln2^3 / 6
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));    // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));    // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_maskz_scalef_ps(keep, p, n));
  const __m512 r = _mm512_rcp14_ps(d);
  const __m512 rr = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
  return fVec(_mm512_mul_ps(x, rr));
}
#endif

// The activation of a row's vector for results of type T: act_vec, or silu_reduced for silu with
// bf16/fp16 results.
template <typename T, int KIND>
static inline fVec act_for(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (KIND == kSilu && !std::is_same_v<T, float>) return silu_reduced(x);
#endif
  return act_vec<KIND>(x);
}

template <int KIND>
static inline float act_scalar(float x) {
  if constexpr (KIND == kSilu) {
    return x / (1.f + std::exp(-x));
  } else if constexpr (KIND == kGeluErf) {
    return 0.5f * x * (1.f + std::erf(x * float(M_SQRT1_2)));
  } else {
    const float inner = float(M_2_SQRTPI * M_SQRT1_2) * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + std::tanh(inner));
  }
}

template <typename T, int KIND>
static void act_and_mul_impl(const ActParams& p) {
  const int64_t d = p.d;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* a = static_cast<const T*>(p.x) + t * p.x_stride;
      const T* b = a + d;
      T* o = static_cast<T*>(p.out) + t * p.out_stride;
      int64_t i = 0;
      for (; i + kVec <= d; i += kVec) store_f(o + i, act_for<T, KIND>(load_f(a + i)) * load_f(b + i));
      for (; i < d; ++i) o[i] = from_f<T>(act_scalar<KIND>(to_f(a[i])) * to_f(b[i]));
    }
  });
}

void act_and_mul_kernel(const ActParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    switch (p.kind) {
      case kSilu: act_and_mul_impl<scalar_t, kSilu>(p); break;
      case kGeluErf: act_and_mul_impl<scalar_t, kGeluErf>(p); break;
      default: act_and_mul_impl<scalar_t, kGeluTanh>(p); break;
    }
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(act_and_mul_kernel, ActParams)

namespace octavo {

static void act_and_mul(at::Tensor& out, const at::Tensor& x, int kind, const char* op) {
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(out);
  TORCH_CHECK(x.dim() == 2, op, ": expected a 2-D [T, 2*D] input, got ", x.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": last dim must be even, got ", x.size(1));
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2, op,
              ": out must be [", x.size(0), ", ", x.size(1) / 2, "], got ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  cpu::ActParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.num_tokens = x.size(0);
  p.d = x.size(1) / 2;
  p.kind = kind;
  p.dtype = cpu::to_dtype(x, op);
  OCTAVO_CALL_CPU_KERNEL(act_and_mul_kernel, p);
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& x) {
  act_and_mul(out, x, 0, "silu_and_mul");
}

void gelu_and_mul_cpu(at::Tensor& out, const at::Tensor& x, const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
  act_and_mul(out, x, approximate == "none" ? 1 : 2, "gelu_and_mul");
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
