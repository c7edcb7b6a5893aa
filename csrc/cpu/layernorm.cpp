// RMSNorm and fused residual-add + RMSNorm on CPU: one row per task, fp32 math, vectorized.
#include <ATen/Parallel.h>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

// Sum of squares of a row of H values (already in fp32 or converted on load).
template <typename T>
static float sum_squares(const T* x, int64_t h) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * kVec <= h; i += 2 * kVec) {
    fVec a = load_f(x + i), b = load_f(x + i + kVec);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  for (; i + kVec <= h; i += kVec) {
    fVec a = load_f(x + i);
    acc0 = at::vec::fmadd(a, a, acc0);
  }
  float s = hsum(acc0 + acc1);
  for (; i < h; ++i) s += to_f(x[i]) * to_f(x[i]);
  return s;
}

// out[i] = x[i] * inv * w[i]
template <typename T>
static void scale_row(T* out, const T* x, const T* w, float inv, int64_t h) {
  const fVec vinv(inv);
  int64_t i = 0;
  for (; i + kVec <= h; i += kVec) store_f(out + i, load_f(x + i) * vinv * load_f(w + i));
  for (; i < h; ++i) out[i] = from_f<T>(to_f(x[i]) * inv * to_f(w[i]));
}

template <typename T>
static void rms_norm_impl(const RmsNormParams& p) {
  const int64_t h = p.hidden;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* x = static_cast<const T*>(p.x) + t * p.x_stride;
      T* out = static_cast<T*>(p.out) + t * p.out_stride;
      const float inv = 1.f / std::sqrt(sum_squares(x, h) / h + p.eps);
      scale_row(out, x, static_cast<const T*>(p.weight), inv, h);
    }
  });
}

// residual <- round(x + residual); x <- rms_norm(residual) * w
template <typename T>
static void fused_add_rms_norm_impl(const RmsNormParams& p) {
  const int64_t h = p.hidden;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* x = static_cast<T*>(p.x) + t * p.x_stride;
      T* r = static_cast<T*>(p.residual) + t * p.residual_stride;
      int64_t i = 0;
      for (; i + kVec <= h; i += kVec) store_f(r + i, load_f(x + i) + load_f(r + i));
      for (; i < h; ++i) r[i] = from_f<T>(to_f(x[i]) + to_f(r[i]));
      const float inv = 1.f / std::sqrt(sum_squares(r, h) / h + p.eps);
      scale_row(x, r, static_cast<const T*>(p.weight), inv, h);
    }
  });
}

void rms_norm_kernel(const RmsNormParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { rms_norm_impl<scalar_t>(p); });
}

void fused_add_rms_norm_kernel(const RmsNormParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { fused_add_rms_norm_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(rms_norm_kernel, RmsNormParams)
OCTAVO_DECLARE_CPU_KERNEL(fused_add_rms_norm_kernel, RmsNormParams)

namespace octavo {

static void check_norm_inputs(const at::Tensor& x, const at::Tensor& other,
                              const at::Tensor& weight, const char* op) {
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(other);
  OCTAVO_CHECK_CPU(weight);
  TORCH_CHECK(x.dim() == 2, op, ": expected a 2-D [T, H] input, got ", x.sizes());
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": shape mismatch ", other.sizes(), " vs ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [",
              x.size(1), "], got ", weight.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, other);
  OCTAVO_CHECK_SAME_DTYPE(x, weight);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(other);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_inputs(x, out, weight, "rms_norm");
  cpu::RmsNormParams p{};
  p.out = out.data_ptr();
  p.x = const_cast<void*>(x.data_ptr());
  p.weight = weight.data_ptr();
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.num_tokens = x.size(0);
  p.hidden = x.size(1);
  p.eps = static_cast<float>(eps);
  p.dtype = cpu::to_dtype(x, "rms_norm");
  OCTAVO_CALL_CPU_KERNEL(rms_norm_kernel, p);
}

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                            double eps) {
  check_norm_inputs(x, residual, weight, "fused_add_rms_norm");
  cpu::RmsNormParams p{};
  p.x = x.data_ptr();
  p.residual = residual.data_ptr();
  p.weight = weight.data_ptr();
  p.x_stride = x.stride(0);
  p.residual_stride = residual.stride(0);
  p.num_tokens = x.size(0);
  p.hidden = x.size(1);
  p.eps = static_cast<float>(eps);
  p.dtype = cpu::to_dtype(x, "fused_add_rms_norm");
  OCTAVO_CALL_CPU_KERNEL(fused_add_rms_norm_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
