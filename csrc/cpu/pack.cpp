// Repacking a dense weight [N, K] into linear_packed's panel layout [ceil(N/64), ceil(K/2), 64, 2]
// once at load (ops_native.pack_linear_panels is the reference), and a 4-bit one into int4_gemm's
// (ops_native.pack_int4_panels; see pack_int4_panels_kernel). torch's permute + contiguous
// moves one element at a time through strided indexing; here a pair of elements is one machine
// word, each thread owns whole panels, and a row is read a cache line at a time while the 64
// outputs' words of that line land in the panel's rows (which stay in L1 meanwhile).
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace octavo::cpu {

struct PackPanelsParams {
  const void* weight;  // [n, k] elements of elem_size bytes, row stride ld (elements)
  void* out;           // [ceil(n/64), ceil(k/2), 64, 2] contiguous
  int64_t n, k, ld;
  int elem_size;       // 2 (bf16 / fp16) or 4 (fp32)
  bool in_place;       // out is weight's own memory (n % 64 == 0, k even, ld == k)
};

struct PackInt4Params {
  const uint8_t* q;          // codes [n, k], row stride q_ld
  const float* scales;       // [n, groups], row stride s_ld
  const float* offsets;      // [n, groups], row stride o_ld
  uint8_t* packed;           // [ceil(n/32), ceil(k/2), 32] contiguous
  float* so;                 // [ceil(n/32), groups, 2, 32] contiguous
  int64_t n, k, groups, q_ld, s_ld, o_ld;
};

struct Q4BlocksParams {
  const uint8_t* raw;        // [rows, row_bytes]: GGUF Q4_0 (18-byte) or Q4_1 (20-byte) blocks
  uint8_t* codes;            // [rows, 32 * blocks] contiguous
  float* d;                  // [rows, blocks]
  float* m;                  // [rows, blocks]
  int64_t rows, blocks, row_bytes;
  bool q4_1;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kPanelRows = 64;

// E: one element; U: one (k, k+1) pair of elements; w: the weight's row 0 (panel p reads its
// rows p * 64 + j at w + (p * 64 + j) * a.ld)
template <typename E, typename U>
static void pack_panel(const PackPanelsParams& a, int64_t p, const E* w) {
  static_assert(sizeof(U) == 2 * sizeof(E));
  constexpr int kLine = 64 / sizeof(U);  // pairs per cache line of a row
  const int64_t k2 = (a.k + 1) / 2, kfull = a.k / 2;
  U* o = static_cast<U*>(a.out) + p * k2 * kPanelRows;
  for (int64_t kk0 = 0; kk0 < kfull; kk0 += kLine) {
    const int64_t nt = std::min<int64_t>(kLine, kfull - kk0);
    for (int j = 0; j < kPanelRows; ++j) {
      const int64_t row = p * kPanelRows + j;
      U* oj = o + kk0 * kPanelRows + j;
      if (row >= a.n) {  // padding outputs of the last panel
        for (int64_t t = 0; t < nt; ++t) oj[t * kPanelRows] = U(0);
        continue;
      }
      const E* r = w + row * a.ld + 2 * kk0;
      U buf[kLine];
      std::memcpy(buf, r, nt * sizeof(U));  // rows need not be pair-aligned in memory
      for (int64_t t = 0; t < nt; ++t) oj[t * kPanelRows] = buf[t];
    }
  }
  if (a.k % 2) {  // the last pair is (w[k-1], 0)
    E* last = reinterpret_cast<E*>(o + kfull * kPanelRows);
    for (int j = 0; j < kPanelRows; ++j) {
      const int64_t row = p * kPanelRows + j;
      last[2 * j] = row < a.n ? w[row * a.ld + a.k - 1] : E(0);
      last[2 * j + 1] = E(0);
    }
  }
}

void pack_linear_panels_kernel(const PackPanelsParams& a) {
  const int64_t panels = (a.n + kPanelRows - 1) / kPanelRows;
  // about 256 KiB of weight per task, so small weights stay on one thread
  const int64_t panel_bytes = kPanelRows * std::max<int64_t>(a.k, 1) * a.elem_size;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / panel_bytes);
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    // in place: a panel's 64 rows and its packed form are the same bytes, so each panel is
    // copied aside first (64 x K elements, in cache) and packed from the copy
    std::vector<uint8_t> scratch(a.in_place ? panel_bytes : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* w = static_cast<const uint8_t*>(a.weight);
      if (a.in_place) {
        std::memcpy(scratch.data(), w + p * panel_bytes, panel_bytes);
        w = scratch.data() - p * panel_bytes;  // row p * 64 of the copy sits at scratch[0]
      }
      if (a.elem_size == 2)
        pack_panel<uint16_t, uint32_t>(a, p, reinterpret_cast<const uint16_t*>(w));
      else
        pack_panel<uint32_t, uint64_t>(a, p, reinterpret_cast<const uint32_t*>(w));
    }
  });
}

// INT4: panel p of 32 outputs holds, in byte 2j+i of its row kk, the code of (output p*32+j,
// k = 2kk+i) in the low nibble and that of (output p*32+16+j, same k) in the high nibble, and
// the group scales and offsets of its 32 outputs as so[p][g][0 | 1][32]; zero padded. The same
// bytes as the reference's (q0 | q1 << 4 in uint8: codes above 15 are not masked there either).
// At load the reference's pad / view / permute / contiguous chain made four passes over the
// codes; here each panel is one pass, its 32 source rows' current lines staying in L1.
constexpr int kInt4Panel = 32;

void pack_int4_panels_kernel(const PackInt4Params& a) {
  const int64_t panels = (a.n + kInt4Panel - 1) / kInt4Panel, k2 = (a.k + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / (kInt4Panel * std::max<int64_t>(a.k, 1)));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint8_t* o = a.packed + p * k2 * kInt4Panel;
      const uint8_t* rows[kInt4Panel];  // nullptr: a padding output
      for (int r = 0; r < kInt4Panel; ++r) {
        const int64_t row = p * kInt4Panel + r;
        rows[r] = row < a.n ? a.q + row * a.q_ld : nullptr;
      }
      for (int64_t kk = 0; kk < k2; ++kk) {
        for (int j = 0; j < kInt4Panel / 2; ++j) {
          for (int i = 0; i < 2; ++i) {
            const int64_t col = 2 * kk + i;
            const uint8_t lo = rows[j] != nullptr && col < a.k ? rows[j][col] : 0;
            const uint8_t hi = rows[j + 16] != nullptr && col < a.k ? rows[j + 16][col] : 0;
            o[kk * kInt4Panel + 2 * j + i] = static_cast<uint8_t>(lo | static_cast<uint8_t>(hi << 4));
          }
        }
      }
      float* so = a.so + p * a.groups * 2 * kInt4Panel;
      for (int64_t g = 0; g < a.groups; ++g)
        for (int r = 0; r < kInt4Panel; ++r) {
          const int64_t row = p * kInt4Panel + r;
          so[(g * 2) * kInt4Panel + r] = row < a.n ? a.scales[row * a.s_ld + g] : 0.f;
          so[(g * 2 + 1) * kInt4Panel + r] = row < a.n ? a.offsets[row * a.o_ld + g] : 0.f;
        }
    }
  });
}

// GGUF's 4-bit blocks, decoded as gguf_loader.q4_blocks does: a block of 32 weights is an fp16
// scale d (Q4_1: then an fp16 min m; Q4_0: m = -8 d) and 16 bytes whose low nibbles are weights
// 0-15 and high nibbles 16-31. One pass over the file's bytes instead of the reference's copy,
// two nibble tensors and their concatenation.
void gguf_q4_blocks_kernel(const Q4BlocksParams& a) {
  const int64_t header = a.q4_1 ? 4 : 2, block_bytes = header + 16;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, a.row_bytes));
  at::parallel_for(0, a.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = a.raw + r * a.row_bytes;
      uint8_t* codes = a.codes + r * a.blocks * 32;
      for (int64_t b = 0; b < a.blocks; ++b) {
        const uint8_t* blk = row + b * block_bytes;
        uint16_t bits;
        std::memcpy(&bits, blk, 2);
        const float d = static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
        float m = -8.f * d;
        if (a.q4_1) {
          std::memcpy(&bits, blk + 2, 2);
          m = static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
        }
        a.d[r * a.blocks + b] = d;
        a.m[r * a.blocks + b] = m;
        const uint8_t* qs = blk + header;
        for (int t = 0; t < 16; ++t) {
          codes[b * 32 + t] = qs[t] & 15;
          codes[b * 32 + 16 + t] = qs[t] >> 4;
        }
      }
    }
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(pack_linear_panels_kernel, PackPanelsParams)
OCTAVO_DECLARE_CPU_KERNEL(pack_int4_panels_kernel, PackInt4Params)
OCTAVO_DECLARE_CPU_KERNEL(gguf_q4_blocks_kernel, Q4BlocksParams)

namespace octavo {

void pack_linear_panels_cpu(at::Tensor& out, const at::Tensor& weight) {
  const char* op = "pack_linear_panels";
  TORCH_CHECK(weight.device().is_cpu() && out.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(weight.dim() == 2 && (weight.size(1) <= 1 || weight.stride(1) == 1), op,
              ": weight must be [N, K] with a unit last stride, got ", weight.sizes());
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(), op, ": out and weight dtypes differ");
  const int64_t es = weight.element_size();
  TORCH_CHECK(es == 2 || es == 4, op, ": weight must have 2- or 4-byte elements, got ",
              weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t panels = (n + 63) / 64, k2 = (k + 1) / 2;
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({panels, k2, 64, 2}), op,
              ": out must be a contiguous [", panels, ", ", k2, ", 64, 2] tensor, got ", out.sizes());
  if (out.numel() == 0) return;
  const bool in_place = out.data_ptr() == weight.data_ptr();
  TORCH_CHECK(!in_place || (n % 64 == 0 && k % 2 == 0 && weight.is_contiguous()), op,
              ": packing in place (out is weight's memory) needs a contiguous weight with N a "
              "multiple of 64 and K even, got ", weight.sizes());
  cpu::PackPanelsParams p{weight.data_ptr(), out.data_ptr(), n, k,
                          n > 1 ? weight.stride(0) : k, static_cast<int>(es), in_place};
  OCTAVO_CALL_CPU_KERNEL(pack_linear_panels_kernel, p);
}

void pack_int4_panels_cpu(at::Tensor& packed, at::Tensor& scales_offsets, const at::Tensor& qweight,
                          const at::Tensor& scales, const at::Tensor& offsets) {
  const char* op = "pack_int4_panels";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&packed, &scales_offsets, &qweight,
                                                                     &scales, &offsets})
    TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  (qweight.size(1) <= 1 || qweight.stride(1) == 1),
              op, ": qweight must be uint8 codes [N, K] with a unit last stride, got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t n = qweight.size(0), k = qweight.size(1);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == n &&
                    (t->size(1) <= 1 || t->stride(1) == 1),
                op, ": scales and offsets must be float32 [N, G] with a unit last stride (N = ", n,
                "), got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(offsets.sizes() == scales.sizes(), op, ": scales and offsets shapes differ: ",
              scales.sizes(), " vs ", offsets.sizes());
  const int64_t groups = scales.size(1), panels = (n + 31) / 32, k2 = (k + 1) / 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.sizes() == at::IntArrayRef({panels, k2, 32}),
              op, ": packed must be a contiguous uint8 [", panels, ", ", k2, ", 32], got ",
              packed.sizes());
  TORCH_CHECK(scales_offsets.scalar_type() == at::kFloat && scales_offsets.is_contiguous() &&
                  scales_offsets.sizes() == at::IntArrayRef({panels, groups, 2, 32}),
              op, ": scales_offsets must be a contiguous float32 [", panels, ", ", groups,
              ", 2, 32], got ", scales_offsets.sizes());
  if (panels == 0) return;
  cpu::PackInt4Params p{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                        offsets.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                        scales_offsets.data_ptr<float>(), n, k, groups,
                        n > 1 ? qweight.stride(0) : k, n > 1 ? scales.stride(0) : groups,
                        n > 1 ? offsets.stride(0) : groups};
  OCTAVO_CALL_CPU_KERNEL(pack_int4_panels_kernel, p);
}

void gguf_q4_blocks_cpu(at::Tensor& codes, at::Tensor& d, at::Tensor& m, const at::Tensor& raw,
                        int64_t ggml_type) {
  const char* op = "gguf_q4_blocks";
  TORCH_CHECK(ggml_type == 2 || ggml_type == 3, op, ": ggml_type must be 2 (Q4_0) or 3 (Q4_1), got ",
              ggml_type);
  const int64_t block_bytes = ggml_type == 3 ? 20 : 18;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&codes, &d, &m, &raw})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": tensors must be contiguous CPU tensors");
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.size(1) % block_bytes == 0, op,
              ": raw must be uint8 [rows, row bytes], row bytes a multiple of ", block_bytes, ", got ",
              raw.sizes());
  const int64_t rows = raw.size(0), blocks = raw.size(1) / block_bytes;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.sizes() == at::IntArrayRef({rows, 32 * blocks}),
              op, ": codes must be uint8 [", rows, ", ", 32 * blocks, "], got ", codes.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&d, &m})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == at::IntArrayRef({rows, blocks}), op,
                ": d and m must be float32 [", rows, ", ", blocks, "], got ", t->sizes());
  if (rows == 0 || blocks == 0) return;
  cpu::Q4BlocksParams p{raw.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(), d.data_ptr<float>(),
                        m.data_ptr<float>(), rows, blocks, raw.size(1), ggml_type == 3};
  OCTAVO_CALL_CPU_KERNEL(gguf_q4_blocks_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
