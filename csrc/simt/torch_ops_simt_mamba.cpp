// torch.ops.octavo_simt.{causal_conv1d, causal_conv1d_update, selective_scan,
// selective_state_update}: the csrc/cuda Mamba-1 launchers on CPU tensors under the SIMT
// emulator (test-only), with the same checks as the CUDA wrappers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/mamba_args.h"

namespace octavo::simt_ops {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;
using OptT = std::optional<at::Tensor>;

void causal_conv1d(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                   at::Tensor& conv_states, const at::Tensor& query_start_loc,
                   const at::Tensor& state_indices, const OptT& has_initial_state, bool silu) {
  TORCH_CHECK(cuda::launch_causal_conv1d(
                  cuda_args::causal_conv1d(out, x, weight, bias, conv_states, query_start_loc,
                                           state_indices, has_initial_state, silu, kCPU,
                                           "causal_conv1d"),
                  nullptr),
              "causal_conv1d: unsupported dtype");
}

void causal_conv1d_update(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_states,
                          const at::Tensor& weight, const OptT& bias,
                          const at::Tensor& state_indices, bool silu) {
  TORCH_CHECK(cuda::launch_causal_conv1d(
                  cuda_args::causal_conv1d(out, x, weight, bias, conv_states, std::nullopt,
                                           state_indices, std::nullopt, silu, kCPU,
                                           "causal_conv1d_update"),
                  nullptr),
              "causal_conv1d_update: unsupported dtype");
}

void selective_scan(at::Tensor& out, const at::Tensor& u, const at::Tensor& delta,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                    const OptT& D_skip, const OptT& z, const OptT& delta_bias, bool delta_softplus,
                    at::Tensor& ssm_states, const at::Tensor& query_start_loc,
                    const at::Tensor& state_indices, const OptT& has_initial_state) {
  TORCH_CHECK(cuda::launch_selective_scan(
                  cuda_args::selective_scan(out, u, delta, A, B, C, D_skip, z, delta_bias,
                                            delta_softplus, ssm_states, query_start_loc,
                                            state_indices, has_initial_state, kCPU,
                                            "selective_scan"),
                  nullptr),
              "selective_scan: unsupported dtype");
}

void selective_state_update(at::Tensor& out, at::Tensor& ssm_states, const at::Tensor& x,
                            const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const OptT& D_skip, const OptT& z,
                            const OptT& dt_bias, bool dt_softplus,
                            const at::Tensor& state_indices) {
  TORCH_CHECK(cuda::launch_selective_scan(
                  cuda_args::selective_scan(out, x, dt, A, B, C, D_skip, z, dt_bias, dt_softplus,
                                            ssm_states, std::nullopt, state_indices, std::nullopt,
                                            kCPU, "selective_state_update"),
                  nullptr),
              "selective_state_update: unsupported dtype");
}

}  // namespace
}  // namespace octavo::simt_ops

TORCH_LIBRARY_FRAGMENT(octavo_simt, m) {
  m.def("causal_conv1d(Tensor! out, Tensor x, Tensor weight, Tensor? bias, Tensor! conv_states, "
        "Tensor query_start_loc, Tensor state_indices, Tensor? has_initial_state, bool silu) -> ()",
        &octavo::simt_ops::causal_conv1d);
  m.def("causal_conv1d_update(Tensor! out, Tensor x, Tensor! conv_states, Tensor weight, "
        "Tensor? bias, Tensor state_indices, bool silu) -> ()",
        &octavo::simt_ops::causal_conv1d_update);
  m.def("selective_scan(Tensor! out, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D_skip, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor! ssm_states, "
        "Tensor query_start_loc, Tensor state_indices, Tensor? has_initial_state) -> ()",
        &octavo::simt_ops::selective_scan);
  m.def("selective_state_update(Tensor! out, Tensor! ssm_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, Tensor? D_skip, Tensor? z, Tensor? dt_bias, bool dt_softplus, "
        "Tensor state_indices) -> ()",
        &octavo::simt_ops::selective_state_update);
}
