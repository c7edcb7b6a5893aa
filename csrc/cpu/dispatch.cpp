// Chooses the CPU kernel variant once per process from cpuid and ATEN_CPU_CAPABILITY.
#include "cpu/dispatch.h"

#include <cstdlib>
#include <cstring>

namespace octavo::cpu {

static Capability detect() {
#if defined(OCTAVO_CPU_X86)
  __builtin_cpu_init();
  Capability best = Capability::kDefault;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Capability::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Capability::kAvx512;
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr) {
    if (std::strcmp(env, "default") == 0) return Capability::kDefault;
    if (std::strcmp(env, "avx2") == 0 && best == Capability::kAvx512) return Capability::kAvx2;
  }
  return best;
#else
  return Capability::kDefault;
#endif
}

Capability cpu_capability() {
  static const Capability cap = detect();
  return cap;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAvx512: return "AVX512";
    case Capability::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace octavo::cpu
