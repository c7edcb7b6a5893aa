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

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <c10/util/BFloat16.h>

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

// One K step of 32 (16 pairs) for 16 rows x 64 outputs: tile 4 takes the rows' 32 K values (x,
// row stride xb bytes), tiles 5-7 take turns holding 16 output columns of the step's 4 KiB of
// panel (wk, pair rows 256 bytes apart), tiles 0-3 add the products to the 64 outputs.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_step(const c10::BFloat16* x, int64_t xb,
                                                                  const c10::BFloat16* wk) {
  constexpr int64_t wb = 2 * 64 * sizeof(c10::BFloat16);
  _tile_loadd(4, x, xb);
  _tile_loadd(5, wk, wb);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, wk + 32, wb);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(7, wk + 64, wb);
  _tile_dpbf16ps(2, 4, 7);
  _tile_loadd(5, wk + 96, wb);
  _tile_dpbf16ps(3, 4, 5);
}

__attribute__((target("amx-tile"))) inline void amx_zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The sums of tiles 0-3 to out [16, 64] fp32 (row stride 64).
__attribute__((target("amx-tile"))) inline void amx_store_sums(float* out) {
  constexpr int64_t ob = 64 * sizeof(float);
  _tile_stored(0, out, ob);
  _tile_stored(1, out + 16, ob);
  _tile_stored(2, out + 32, ob);
  _tile_stored(3, out + 48, ob);
}

// A 64-output panel of K pairs [ceil(K/2), 64, 2] (linear_packed's and the fused MoE's layout:
// pair rows 256 bytes apart, the tiles' B layout) times 16 rows of x: out [16, 64] fp32 = x rows
// (first row xr, row stride xs elements) . the panel's pairs [0, kmain), kmain a multiple of 16.
// K in steps of 32: tile 4 holds 16 rows x 32 K of x, tiles 5-7 take turns holding 16 output
// columns, tiles 0-3 sum the 64 outputs. Needs amx_config_full_tiles() on this thread.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_panel_block(const c10::BFloat16* xr,
                                                                         int64_t xs,
                                                                         const c10::BFloat16* wp,
                                                                         int64_t kmain, float* out) {
  constexpr int64_t kCols = 64, kPairsPerStep = 16;
  amx_memory_barrier();
  amx_zero_sums();
  const int64_t xb = xs * static_cast<int64_t>(sizeof(c10::BFloat16));
  for (int64_t kk = 0; kk < kmain; kk += kPairsPerStep) amx_step(xr + 2 * kk, xb, wp + kk * 2 * kCols);
  amx_store_sums(out);
  amx_memory_barrier();
}

// amx_panel_block for nblk (2..4) consecutive 16-row blocks of x (block b's first row at
// xr + 16 * b * xs), K in chunks of kAmxChunkSteps steps: block 0 streams a chunk's B tiles from
// memory, the other blocks find them in L1, and the last block's pass pulls the next chunk into
// L2 meanwhile, so the later blocks' products overlap the next chunk's reads (one panel per
// block, as before, read the panel from memory once and again from L2, one after the other).
// The sums wait in out ([nblk, 16, 64] fp32) between chunks.
constexpr int64_t kAmxChunkSteps = 8;  // 8 x 4 KiB of B: in L1 while the blocks take turns

__attribute__((target("amx-tile,amx-bf16"))) inline void amx_panel_blocks(const c10::BFloat16* xr,
                                                                          int64_t xs, int nblk,
                                                                          const c10::BFloat16* wp,
                                                                          int64_t kmain, float* out) {
  constexpr int64_t kCols = 64, kPairsPerStep = 16, kChunk = kAmxChunkSteps * kPairsPerStep;
  constexpr int64_t wb = 2 * kCols * sizeof(c10::BFloat16), ob = kCols * sizeof(float);
  constexpr int64_t kChunkBytes = kChunk * wb;  // (wb: bytes from one pair row to the next)
  const int64_t xb = xs * static_cast<int64_t>(sizeof(c10::BFloat16));
  amx_memory_barrier();
  for (int64_t k0 = 0; k0 < kmain; k0 += kChunk) {
    const int64_t k1 = std::min(kmain, k0 + kChunk);
    for (int b = 0; b < nblk; ++b) {
      float* o = out + b * 16 * kCols;
      if (k0 == 0) {
        amx_zero_sums();
      } else {
        _tile_loadd(0, o, ob);
        _tile_loadd(1, o + 16, ob);
        _tile_loadd(2, o + 32, ob);
        _tile_loadd(3, o + 48, ob);
      }
      const c10::BFloat16* x = xr + 16 * b * xs;
      const bool prefetch = b == nblk - 1;  // (past the last chunk: the next panel, this thread's next)
      for (int64_t kk = k0; kk < k1; kk += kPairsPerStep) {
        const c10::BFloat16* wk = wp + kk * 2 * kCols;
        if (prefetch) {
          const char* f = reinterpret_cast<const char*>(wk) + kChunkBytes;
          for (int l = 0; l < kPairsPerStep * wb; l += 64) _mm_prefetch(f + l, _MM_HINT_T1);
        }
        amx_step(x + 2 * kk, xb, wk);
      }
      amx_store_sums(o);
    }
  }
  amx_memory_barrier();
}

}  // namespace octavo::cpu::CPU_CAPABILITY
#endif  // CPU_CAPABILITY_AVX512
