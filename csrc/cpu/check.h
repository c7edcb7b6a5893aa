// Input checks and dtype mapping shared by the CPU launchers (default-capability TUs only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "cpu/params.h"

namespace octavo::cpu {

inline DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(),
                  " (expected float32, bfloat16 or float16)");
  }
  return DType::kFloat32;
}

// An fp8 cache's K/V scales (vLLM's k_scale / v_scale), checked for every cache dtype.
inline void check_kv_scales(double k_scale, double v_scale, const char* op) {
  TORCH_CHECK(std::isfinite(k_scale) && k_scale > 0 && std::isfinite(v_scale) && v_scale > 0, op,
              ": k_scale and v_scale must be positive and finite, got ", k_scale, " and ", v_scale);
}

}  // namespace octavo::cpu

#define OCTAVO_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")
#define OCTAVO_CHECK_LAST_CONTIG(t) \
  TORCH_CHECK((t).size(-1) <= 1 || (t).stride(-1) == 1, #t " must have a unit last stride")
#define OCTAVO_CHECK_SAME_DTYPE(a, b)                                                  \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " dtypes differ: ", \
              (a).scalar_type(), " vs ", (b).scalar_type())
