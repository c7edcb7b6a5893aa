// torch.ops.octavo_simt.*: the csrc/cuda launchers run on CPU tensors under the SIMT emulator
// (test-only extension), plus the emulator's self-test kernels. The only file here with torch.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda/params.h"
#include "simt/selftest.h"

namespace octavo::simt_ops {
namespace {

cuda::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), "; use float32, bfloat16 or float16");
  }
}

void check_2d(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (emulated CUDA)");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " needs a unit last stride");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " != ", like.scalar_type());
}

void check_norm(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w, const char* op) {
  check_2d(x, x, op, "x");
  check_2d(other, x, op, "out/residual");
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": shape mismatch ", other.sizes(), " vs ", x.sizes());
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              op, ": weight must be a contiguous [H] CPU tensor of x's dtype");
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, out, weight, "rms_norm");
  cuda::RmsNormArgs a{out.data_ptr(), const_cast<void*>(x.data_ptr()), nullptr, weight.data_ptr(),
                      out.stride(0), x.stride(0), 0, x.size(0), x.size(1), float(eps),
                      to_dtype(x, "rms_norm")};
  TORCH_CHECK(cuda::launch_rms_norm(a, nullptr), "rms_norm: bad dtype");
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm(x, residual, weight, "fused_add_rms_norm");
  cuda::RmsNormArgs a{nullptr, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), 0,
                      x.stride(0), residual.stride(0), x.size(0), x.size(1), float(eps),
                      to_dtype(x, "fused_add_rms_norm")};
  TORCH_CHECK(cuda::launch_fused_add_rms_norm(a, nullptr), "fused_add_rms_norm: bad dtype");
}

void act_and_mul(at::Tensor& out, const at::Tensor& x, int kind, const char* op) {
  check_2d(x, x, op, "x");
  check_2d(out, x, op, "out");
  TORCH_CHECK(x.size(1) % 2 == 0 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2, op,
              ": expected x [T, 2*D] and out [T, D], got ", x.sizes(), " and ", out.sizes());
  cuda::ActArgs a{out.data_ptr(), x.data_ptr(), out.stride(0), x.stride(0), x.size(0),
                  x.size(1) / 2, kind, to_dtype(x, op)};
  TORCH_CHECK(cuda::launch_act_and_mul(a, nullptr), op, ": bad dtype");
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) { act_and_mul(out, x, 0, "silu_and_mul"); }

void gelu_and_mul(at::Tensor& out, const at::Tensor& x, const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
  act_and_mul(out, x, approximate == "none" ? 1 : 2, "gelu_and_mul");
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
  // self tests (simt/selftest.cu)
  m.def("selftest_divergent_sync(Tensor! out, int mode) -> ()", &divergent_sync);
  m.def("selftest_shuffle(Tensor! out, Tensor x, int kind, int arg, int width) -> ()", &shuffle);
  m.def("selftest_votes(Tensor! out, Tensor pred, int mask) -> ()", &votes);
  m.def("selftest_shared_poison(Tensor! out) -> ()", &shared_poison);
  m.def("selftest_mma(Tensor! d, Tensor a, Tensor b, Tensor c) -> ()", &mma);
  m.def("selftest_ldmatrix(Tensor! out, Tensor m, int num, bool trans, bool wait) -> ()", &ldmatrix);
  m.def("selftest_atomics(Tensor! ints, Tensor! sum, int blocks, int threads) -> ()", &atomics);
}
