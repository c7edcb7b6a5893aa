// Tensor-level CUDA entry points: check inputs, set the device guard, take the current stream,
// call the raw launchers in csrc/cuda/*.cu (which stay free of torch headers).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/params.h"
#include "ops.h"

namespace octavo {
namespace {

cuda::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
  return cuda::DType::kFloat32;
}

void check_2d(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name,
              " must be on ", like.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " needs a unit last stride");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " != ", like.scalar_type());
}

void check_norm(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w, const char* op) {
  check_2d(x, x, op, "x");
  check_2d(other, x, op, "out/residual");
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": shape mismatch ", other.sizes(), " vs ", x.sizes());
  TORCH_CHECK(w.is_cuda() && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              op, ": weight must be a contiguous [H] tensor of x's dtype and device");
}

}  // namespace

void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, out, weight, "rms_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::RmsNormArgs a{out.data_ptr(), const_cast<void*>(x.data_ptr()), nullptr, weight.data_ptr(),
                      out.stride(0), x.stride(0), 0, x.size(0), x.size(1), float(eps),
                      to_dtype(x, "rms_norm")};
  TORCH_CHECK(cuda::launch_rms_norm(a, c10::cuda::getCurrentCUDAStream()), "rms_norm: bad dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  check_norm(x, residual, weight, "fused_add_rms_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::RmsNormArgs a{nullptr, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), 0,
                      x.stride(0), residual.stride(0), x.size(0), x.size(1), float(eps),
                      to_dtype(x, "fused_add_rms_norm")};
  TORCH_CHECK(cuda::launch_fused_add_rms_norm(a, c10::cuda::getCurrentCUDAStream()),
              "fused_add_rms_norm: bad dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static void act_and_mul_cuda(at::Tensor& out, const at::Tensor& x, int kind, const char* op) {
  check_2d(x, x, op, "x");
  check_2d(out, x, op, "out");
  TORCH_CHECK(x.size(1) % 2 == 0 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2, op,
              ": expected x [T, 2*D] and out [T, D], got ", x.sizes(), " and ", out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::ActArgs a{out.data_ptr(), x.data_ptr(), out.stride(0), x.stride(0), x.size(0),
                  x.size(1) / 2, kind, to_dtype(x, op)};
  TORCH_CHECK(cuda::launch_act_and_mul(a, c10::cuda::getCurrentCUDAStream()), op, ": bad dtype");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& x) {
  act_and_mul_cuda(out, x, 0, "silu_and_mul");
}

void gelu_and_mul_cuda(at::Tensor& out, const at::Tensor& x, const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
  act_and_mul_cuda(out, x, approximate == "none" ? 1 : 2, "gelu_and_mul");
}

}  // namespace octavo
