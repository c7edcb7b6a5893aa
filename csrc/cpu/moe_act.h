// The fused MoE kernels' activation step (moe.cpp, moe_int4.cpp, moe_int8.cpp): act(gate) * up
// for act 0 silu, 1 gelu (erf), 2 gelu (tanh), with activation.cpp's formulas (its plain
// division and exp for silu). Lives in the namespace octavo::cpu::CPU_CAPABILITY (see
// cpu_types.h).
#pragma once

#include <cmath>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

inline float activate(float x, int act) {
  switch (act) {
    case 0: return x / (1.f + std::exp(-x));
    case 1: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    default: {
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + std::tanh(inner));
    }
  }
}

// dst[j] = act(g[j]) * u[j], j < n: kVec lanes at a time with at::vec's exp / erf / tanh, the
// tail scalar (a scalar activate per element cost a third of the AMX tiles' time at prefill).
template <typename T>
void act_mul(const float* g, const float* u, int n, int act, T* dst) {
  int j = 0;
  for (; j + kVec <= n; j += kVec) {
    const fVec x = fVec::loadu(g + j);
    fVec a;
    if (act == 0) {
      a = x / (fVec(1.f) + x.neg().exp());
    } else if (act == 1) {
      a = fVec(0.5f) * x * (fVec(1.f) + (x * fVec(0.70710678118654752f)).erf());
    } else {
      const fVec inner = fVec(0.79788456080286536f) * (x + fVec(0.044715f) * x * x * x);
      a = fVec(0.5f) * x * (fVec(1.f) + inner.tanh());
    }
    store_f(dst + j, a * fVec::loadu(u + j));
  }
  for (; j < n; ++j) dst[j] = from_f<T>(activate(g[j], act) * u[j]);
}

}  // namespace octavo::cpu::CPU_CAPABILITY
