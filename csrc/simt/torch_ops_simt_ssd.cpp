// torch.ops.octavo_simt.{ssd_chunk_scan, ssd_state_update}: the csrc/cuda SSD launcher on CPU
// tensors under the SIMT emulator (test-only), with the same checks as the CUDA wrappers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/ssd_args.h"

namespace octavo::simt_ops {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;

void ssd_chunk_scan(at::Tensor& out, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, int64_t chunk_size,
                    const std::optional<at::Tensor>& D_skip, const std::optional<at::Tensor>& dt_bias,
                    bool dt_softplus, double dt_min, double dt_max, at::Tensor& ssm_states,
                    const at::Tensor& query_start_loc, const at::Tensor& state_indices,
                    const std::optional<at::Tensor>& has_initial_state) {
  TORCH_CHECK(chunk_size > 0, "ssd_chunk_scan: chunk_size must be positive");
  TORCH_CHECK(cuda::launch_ssd(cuda_args::ssd(out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus,
                                              dt_min, dt_max, ssm_states, &query_start_loc,
                                              state_indices, has_initial_state, "ssd_chunk_scan",
                                              kCPU),
                               nullptr),
              "ssd_chunk_scan: unsupported dtype or state size");
}

void ssd_state_update(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                      const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus, double dt_min,
                      double dt_max, const at::Tensor& state_indices) {
  TORCH_CHECK(cuda::launch_ssd(cuda_args::ssd(out, x, dt, A, B, C, D_skip, dt_bias, dt_softplus,
                                              dt_min, dt_max, ssm_states, nullptr, state_indices,
                                              std::nullopt, "ssd_state_update", kCPU),
                               nullptr),
              "ssd_state_update: unsupported dtype or state size");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("ssd_chunk_scan(Tensor! out, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "int chunk_size, Tensor? D_skip, Tensor? dt_bias, bool dt_softplus, float dt_min, "
        "float dt_max, Tensor! ssm_states, Tensor query_start_loc, Tensor state_indices, "
        "Tensor? has_initial_state) -> ()", &octavo::simt_ops::ssd_chunk_scan);
  m.def("ssd_state_update(Tensor! out, Tensor! ssm_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, Tensor? D_skip, Tensor? dt_bias, bool dt_softplus, float dt_min, "
        "float dt_max, Tensor state_indices) -> ()", &octavo::simt_ops::ssd_state_update);
}
