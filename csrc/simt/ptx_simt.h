// CPU versions of the wrappers in cuda/ptx.cuh: warp-wide mma.sync and ldmatrix gather the
// fragments of all 32 lanes (layouts exactly as in the PTX ISA), cp.async copies land at the wait.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt/simt.h"

namespace octavo::simt {

inline float lo_half(uint32_t r, bool bf16) {
  const auto v = static_cast<uint16_t>(r & 0xffffu);
  return bf16 ? fp::bf16_to_float(v) : fp::half_to_float(v);
}
inline float hi_half(uint32_t r, bool bf16) { return lo_half(r >> 16, bf16); }

struct MmaIn { uint32_t a[4], b[2]; float c[4]; };

// m16n8k16, A row-major 16x16, B "col" 16x8, C/D 16x8 fp32. Lane l: g = l / 4, t = l % 4;
// a[r] holds A[g + 8 (r % 2)][2t + 8 (r / 2) + {0,1}], b[r] holds B[2t + 8r + {0,1}][g],
// c[i] is C[g + 8 (i / 2)][2t + i % 2]. Lower 16 bits = lower column (A) / row (B).
template <bool BF16>
void mma_m16n8k16_fn(WarpCall* const* lanes, unsigned) {
  float A[16][16], B[16][8], D[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& in = *static_cast<const MmaIn*>(lanes[l]->in);
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
      A[row][col] = lo_half(in.a[r], BF16);
      A[row][col + 1] = hi_half(in.a[r], BF16);
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + 8 * r][g] = lo_half(in.b[r], BF16);
      B[2 * t + 8 * r + 1][g] = hi_half(in.b[r], BF16);
    }
    for (int i = 0; i < 4; ++i) D[g + 8 * (i / 2)][2 * t + i % 2] = in.c[i];
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) D[m][n] = std::fma(A[m][k], B[k][n], D[m][n]);
  for (int l = 0; l < 32; ++l) {
    auto* out = static_cast<float*>(lanes[l]->out);
    for (int i = 0; i < 4; ++i) out[i] = D[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2];
  }
}

template <bool BF16>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                  Site site) {
  const MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  float out[4];
  WarpCall call{&mma_m16n8k16_fn<BF16>, 0xffffffffu, &in, out, 0,
                BF16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", site};
  warp_collective(call);
  std::memcpy(d, out, sizeof out);
}

// m16n8k32 with e4m3 operands (sm_89+): A row-major 16x32, B "col" 32x8, four bytes per register,
// the lowest byte holding the lowest k. Lane l: g = l / 4, t = l % 4; a[r] holds
// A[g + 8 (r % 2)][4t + 16 (r / 2) + 0..3], b[r] holds B[4t + 16 r + 0..3][g]; C/D as m16n8k16.
// Products of e4m3 values are exact in fp32; the sum is taken in k order.
inline void mma_m16n8k32_e4m3_fn(WarpCall* const* lanes, unsigned) {
  float A[16][32], B[32][8], D[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& in = *static_cast<const MmaIn*>(lanes[l]->in);
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i)
        A[g + 8 * (r % 2)][4 * t + 16 * (r / 2) + i] = fp::e4m3_to_float(uint8_t(in.a[r] >> (8 * i)));
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i)
        B[4 * t + 16 * r + i][g] = fp::e4m3_to_float(uint8_t(in.b[r] >> (8 * i)));
    for (int i = 0; i < 4; ++i) D[g + 8 * (i / 2)][2 * t + i % 2] = in.c[i];
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 32; ++k) D[m][n] = std::fma(A[m][k], B[k][n], D[m][n]);
  for (int l = 0; l < 32; ++l) {
    auto* out = static_cast<float*>(lanes[l]->out);
    for (int i = 0; i < 4; ++i) out[i] = D[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2];
  }
}

inline void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4], Site site) {
  const MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  float out[4];
  WarpCall call{&mma_m16n8k32_e4m3_fn, 0xffffffffu, &in, out, 0, "mma.sync.m16n8k32.e4m3", site};
  warp_collective(call);
  std::memcpy(d, out, sizeof out);
}

struct MmaS8In { uint32_t a[4], b[2]; int c[4]; };

// m16n8k32 with s8 operands: the e4m3 fragment layout above, bytes read as int8, exact int32
// sums (wrapping as the hardware does without .satfinite).
inline void mma_m16n8k32_s8_fn(WarpCall* const* lanes, unsigned) {
  int32_t A[16][32], B[32][8];
  uint32_t D[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& in = *static_cast<const MmaS8In*>(lanes[l]->in);
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i)
        A[g + 8 * (r % 2)][4 * t + 16 * (r / 2) + i] = int8_t(uint8_t(in.a[r] >> (8 * i)));
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) B[4 * t + 16 * r + i][g] = int8_t(uint8_t(in.b[r] >> (8 * i)));
    for (int i = 0; i < 4; ++i) D[g + 8 * (i / 2)][2 * t + i % 2] = uint32_t(in.c[i]);
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 32; ++k) D[m][n] += uint32_t(A[m][k] * B[k][n]);
  for (int l = 0; l < 32; ++l) {
    auto* out = static_cast<int*>(lanes[l]->out);
    for (int i = 0; i < 4; ++i) out[i] = int(D[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2]);
  }
}

inline void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const int (&c)[4], Site site) {
  const MmaS8In in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  int out[4];
  WarpCall call{&mma_m16n8k32_s8_fn, 0xffffffffu, &in, out, 0, "mma.sync.m16n8k32.s8", site};
  warp_collective(call);
  std::memcpy(d, out, sizeof out);
}

// ldmatrix .m8n8 .b16: lanes 8j..8j+7 give the row addresses of matrix j. Without .trans, lane l
// receives row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix; with .trans, rows 2(l%4) and
// 2(l%4)+1 of column l/4 (i.e. the same positions of the transposed matrix).
template <int NUM, bool TRANS>
void ldmatrix_fn(WarpCall* const* lanes, unsigned) {
  for (int l = 0; l < 32; ++l) {
    auto* out = static_cast<uint32_t*>(lanes[l]->out);
    for (int j = 0; j < NUM; ++j) {
      uint16_t v[2];
      for (int e = 0; e < 2; ++e) {
        const int row = TRANS ? 2 * (l % 4) + e : l / 4;
        const int col = TRANS ? l / 4 : 2 * (l % 4) + e;
        const auto* base = reinterpret_cast<const unsigned char*>(lanes[8 * j + row]->arg);
        std::memcpy(&v[e], base + 2 * col, 2);
      }
      out[j] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
    }
  }
}

template <int NUM, bool TRANS>
void ldmatrix(uint32_t (&r)[NUM], const void* row_ptr, Site site) {
  const unsigned lane = current().lane;
  if (lane < 8u * NUM && (reinterpret_cast<uintptr_t>(row_ptr) & 15u))
    fail("ldmatrix: row address of lane " + std::to_string(lane) + " is not 16-byte aligned", site);
  uint32_t out[NUM];
  WarpCall call{&ldmatrix_fn<NUM, TRANS>, 0xffffffffu, nullptr, out,
                reinterpret_cast<uint64_t>(row_ptr), TRANS ? "ldmatrix.trans" : "ldmatrix", site};
  warp_collective(call);
  std::memcpy(r, out, sizeof out);
}

}  // namespace octavo::simt

namespace octavo::cuda {

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4], simt::Site s = simt::Site::current()) {
  simt::mma_m16n8k16<true>(d, a, b, c, s);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4], simt::Site s = simt::Site::current()) {
  simt::mma_m16n8k16<false>(d, a, b, c, s);
}
inline void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4], simt::Site s = simt::Site::current()) {
  simt::mma_m16n8k32_e4m3(d, a, b, c, s);
}
inline void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const int (&c)[4], simt::Site s = simt::Site::current()) {
  simt::mma_m16n8k32_s8(d, a, b, c, s);
}
inline void ldmatrix_x1(uint32_t (&r)[1], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<1, false>(r, p, s); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<2, false>(r, p, s); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<4, false>(r, p, s); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<1, true>(r, p, s); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<2, true>(r, p, s); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p, simt::Site s = simt::Site::current()) { simt::ldmatrix<4, true>(r, p, s); }

inline void cp_async_16(void* smem, const void* gmem) { simt::cp_async_enqueue(smem, gmem, 16); }
inline void cp_async_commit() { simt::cp_async_commit(); }
template <int N>
inline void cp_async_wait() { simt::cp_async_wait(N); }
inline void cp_async_wait_all() { simt::cp_async_commit(); simt::cp_async_wait(0); }

}  // namespace octavo::cuda
