// torch.ops.octavo_simt.*: the csrc/cuda launchers run on CPU tensors under the SIMT emulator
// (test-only extension), plus the emulator's self-test kernels. The only file here with torch.
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/torch_args.h"
#include "simt/selftest.h"

namespace octavo::simt_ops {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;

template <typename Args>
void run(bool (*launcher)(const Args&, cudaStream_t), const Args& a, const char* op) {
  TORCH_CHECK(launcher(a, nullptr), op, ": unsupported dtype");
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  run(cuda::launch_rms_norm, cuda_args::rms_norm(out, x, weight, eps, kCPU), "rms_norm");
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  run(cuda::launch_fused_add_rms_norm, cuda_args::fused_add_rms_norm(x, residual, weight, eps, kCPU),
      "fused_add_rms_norm");
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  run(cuda::launch_act_and_mul, cuda_args::act_and_mul(out, x, 0, "silu_and_mul", kCPU), "silu_and_mul");
}

void gelu_and_mul(at::Tensor& out, const at::Tensor& x, const std::string& approximate) {
  const int kind = cuda_args::gelu_kind(approximate);
  run(cuda::launch_act_and_mul, cuda_args::act_and_mul(out, x, kind, "gelu_and_mul", kCPU), "gelu_and_mul");
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  run(cuda::launch_rotary_embedding,
      cuda_args::rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, kCPU),
      "rotary_embedding");
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale,
                       double v_scale) {
  run(cuda::launch_reshape_and_cache,
      cuda_args::reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale,
                                   v_scale, kCPU),
      "reshape_and_cache");
}

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& block_table, double scale,
                     int64_t sliding_window, double soft_cap,
                     const std::optional<at::Tensor>& alibi_slopes, double k_scale,
                     double v_scale) {
  cuda::PagedAttentionArgs a =
      cuda_args::paged_attention(out, query, key_cache, value_cache, query_start_loc, seq_lens,
                                 block_table, scale, sliding_window, soft_cap, alibi_slopes,
                                 k_scale, v_scale, kCPU);
  // poisoned like the GPU's uninitialized memory: a partial the merge reads unwritten shows up
  at::Tensor workspace = at::full({cuda::paged_attention_workspace_floats(a)}, NAN, at::kFloat);
  a.workspace = workspace.numel() ? workspace.data_ptr<float>() : nullptr;
  run(cuda::launch_paged_attention, a, "paged_attention");
}

// ---- self tests -----------------------------------------------------------------------------
void expect(const at::Tensor& t, at::ScalarType type, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == type && t.numel() == numel,
              what, ": expected a contiguous CPU tensor of ", numel, " ", type, ", got ", t.sizes(), " ", t.scalar_type());
}

void divergent_sync(at::Tensor& out, int64_t mode) {
  expect(out, at::kInt, 64, "divergent_sync out");
  simt_selftest::divergent_sync(out.data_ptr<int32_t>(), static_cast<int>(mode));
}

void shuffle(at::Tensor& out, const at::Tensor& x, int64_t kind, int64_t arg, int64_t width) {
  TORCH_CHECK(x.numel() % 64 == 0, "shuffle: x must hold whole blocks of 64 threads");
  expect(x, at::kFloat, x.numel(), "shuffle x");
  expect(out, at::kFloat, x.numel(), "shuffle out");
  simt_selftest::shuffle(out.data_ptr<float>(), x.data_ptr<float>(), static_cast<int>(x.numel()),
                         static_cast<int>(kind), static_cast<int>(arg), static_cast<int>(width));
}

void votes(at::Tensor& out, const at::Tensor& pred, int64_t mask) {
  expect(pred, at::kInt, 32, "votes pred");
  expect(out, at::kInt, 96, "votes out");
  simt_selftest::votes(out.data_ptr<int32_t>(), pred.data_ptr<int32_t>(), static_cast<uint32_t>(mask));
}

void shared_poison(at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 2, "shared_poison: out must be [blocks, 2]");
  expect(out, at::kInt, out.numel(), "shared_poison out");
  simt_selftest::shared_poison(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), static_cast<int>(out.size(0)));
}

void mma(at::Tensor& d, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "mma: a and b must both be bfloat16 or both float16");
  expect(a, a.scalar_type(), 256, "mma a [16, 16]");
  expect(b, a.scalar_type(), 128, "mma b [16, 8]");
  expect(c, at::kFloat, 128, "mma c [16, 8]");
  expect(d, at::kFloat, 128, "mma d [16, 8]");
  simt_selftest::mma(d.data_ptr<float>(), static_cast<const uint16_t*>(a.data_ptr()),
                     static_cast<const uint16_t*>(b.data_ptr()), c.data_ptr<float>(),
                     a.scalar_type() == at::kBFloat16);
}

void ldmatrix(at::Tensor& out, const at::Tensor& m, int64_t num, bool trans, bool wait) {
  TORCH_CHECK(num == 1 || num == 2 || num == 4, "ldmatrix: num must be 1, 2 or 4");
  expect(m, at::kShort, 256, "ldmatrix m [4, 8, 8]");
  expect(out, at::kInt, 32 * num, "ldmatrix out [32, num]");
  simt_selftest::ldmatrix(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
                          reinterpret_cast<const uint16_t*>(m.data_ptr<int16_t>()),
                          static_cast<int>(num), trans, wait);
}

void atomics(at::Tensor& ints, at::Tensor& sum, int64_t blocks, int64_t threads) {
  expect(ints, at::kLong, 5, "atomics ints");
  expect(sum, at::kFloat, 1, "atomics sum");
  simt_selftest::atomics(ints.data_ptr<int64_t>(), sum.data_ptr<float>(), static_cast<int>(blocks),
                         static_cast<int>(threads));
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY(octavo_simt, m) {
  using namespace octavo::simt_ops;
  // the octavo ops of the same names, computed by the csrc/cuda kernels under emulation
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()", &rms_norm);
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()", &fused_add_rms_norm);
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()", &silu_and_mul);
  m.def("gelu_and_mul(Tensor! out, Tensor x, str approximate) -> ()", &gelu_and_mul);
  m.def("rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()", &rotary_embedding);
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
        "Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()", &reshape_and_cache);
  m.def("paged_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
        "Tensor query_start_loc, Tensor seq_lens, Tensor block_table, float scale, "
        "int sliding_window, float soft_cap, Tensor? alibi_slopes, float k_scale=1.0, "
        "float v_scale=1.0) -> ()", &paged_attention);
  // self tests (simt/selftest.cu)
  m.def("selftest_divergent_sync(Tensor! out, int mode) -> ()", &divergent_sync);
  m.def("selftest_shuffle(Tensor! out, Tensor x, int kind, int arg, int width) -> ()", &shuffle);
  m.def("selftest_votes(Tensor! out, Tensor pred, int mask) -> ()", &votes);
  m.def("selftest_shared_poison(Tensor! out) -> ()", &shared_poison);
  m.def("selftest_mma(Tensor! d, Tensor a, Tensor b, Tensor c) -> ()", &mma);
  m.def("selftest_ldmatrix(Tensor! out, Tensor m, int num, bool trans, bool wait) -> ()", &ldmatrix);
  m.def("selftest_atomics(Tensor! ints, Tensor! sum, int blocks, int threads) -> ()", &atomics);
}
