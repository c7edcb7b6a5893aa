// Runtime selection of the CPU kernel variant (DEFAULT / AVX2 / AVX512) built for each op.
#pragma once

#include "cpu/params.h"

namespace octavo::cpu {

enum class Capability { kDefault, kAvx2, kAvx512 };

// Best variant this CPU runs; ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers it (as in torch).
Capability cpu_capability();
const char* capability_name(Capability c);

}  // namespace octavo::cpu

// Declares KERNEL(const PARAMS&) in each capability namespace.
#if defined(OCTAVO_CPU_X86)
#define OCTAVO_DECLARE_CPU_KERNEL(KERNEL, PARAMS)                 \
  namespace octavo::cpu::DEFAULT { void KERNEL(const PARAMS&); } \
  namespace octavo::cpu::AVX2 { void KERNEL(const PARAMS&); }    \
  namespace octavo::cpu::AVX512 { void KERNEL(const PARAMS&); }
#define OCTAVO_CALL_CPU_KERNEL(KERNEL, P)                                           \
  switch (::octavo::cpu::cpu_capability()) {                                        \
    case ::octavo::cpu::Capability::kAvx512: ::octavo::cpu::AVX512::KERNEL(P); break; \
    case ::octavo::cpu::Capability::kAvx2: ::octavo::cpu::AVX2::KERNEL(P); break;     \
    default: ::octavo::cpu::DEFAULT::KERNEL(P); break;                               \
  }
#else
#define OCTAVO_DECLARE_CPU_KERNEL(KERNEL, PARAMS) \
  namespace octavo::cpu::DEFAULT { void KERNEL(const PARAMS&); }
#define OCTAVO_CALL_CPU_KERNEL(KERNEL, P) ::octavo::cpu::DEFAULT::KERNEL(P)
#endif
