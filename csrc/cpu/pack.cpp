// Repacking a dense weight [N, K] into linear_packed's panel layout [ceil(N/64), ceil(K/2), 64, 2]
// once at load (ops_native.pack_linear_panels is the reference). torch's permute + contiguous
// moves one element at a time through strided indexing; here a pair of elements is one machine
// word, each thread owns whole panels, and a row is read a cache line at a time while the 64
// outputs' words of that line land in the panel's rows (which stay in L1 meanwhile).
#include <ATen/Parallel.h>

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

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(pack_linear_panels_kernel, PackPanelsParams)

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

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
