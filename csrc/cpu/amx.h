// AMX (Advanced Matrix Extensions: Sapphire Rapids and later Xeons) helpers for the AVX512 build
// of the CPU kernels: detection with the Linux permission request, and one tile configuration.
// A TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 16-pair x 16-column tile B (each row of B
// holds 16 columns x a K pair, the layout the packed linear weights already have) into a 16 x 16
// fp32 tile C; eight such tile registers exist.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace octavo::cpu::CPU_CAPABILITY {

// True where the CPU has AMX-BF16 and the kernel lets this process use the tile state (Linux 5.16+
// grants it on request). OCTAVO_CPU_NO_AMX=1 keeps the AVX-512 kernels (tests compare both).
inline bool use_amx() {
  static const bool ok = [] {
    if (std::getenv("OCTAVO_CPU_NO_AMX") != nullptr) return false;
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

// The LDTILECFG operand (palette 1): per tile, bytes per row and rows.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: C as 16 x 16 fp32, A as 16 rows x 32 bf16, B as 16 K pairs x
// 16 columns. Loaded once per thread and task; LDTILECFG also zeroes the tiles.
__attribute__((target("amx-tile"))) inline void amx_config_full_tiles() {
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes only, which let it drop the
  // stores above: the whole 64-byte operand goes to the instruction here.
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

// Tile loads and stores are asm statements that name no memory: a compiler barrier around a
// tile sequence keeps the plain loads and stores of the same buffers on their side of it.
inline void amx_memory_barrier() { asm volatile("" ::: "memory"); }

__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

}  // namespace octavo::cpu::CPU_CAPABILITY
#endif  // CPU_CAPABILITY_AVX512
