// Gated activations on CPU: out = act(x[:, :D]) * x[:, D:] for silu and gelu (erf / tanh).
#include <ATen/Parallel.h>

#include <cmath>

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
      for (; i + kVec <= d; i += kVec) store_f(o + i, act_vec<KIND>(load_f(a + i)) * load_f(b + i));
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
