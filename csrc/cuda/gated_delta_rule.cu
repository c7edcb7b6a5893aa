// Launcher of the gated delta rule (gated_delta_rule.cuh); the grid depends on shapes only.
#include "cuda/gated_delta_rule.cuh"

namespace octavo::cuda {

bool launch_gated_delta_rule(const GdrArgs& a, cudaStream_t stream) {
  if (a.num_seqs == 0 || a.heads == 0 || a.vdim == 0) return true;
  const dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((a.vdim + kGdrCols - 1) / kGdrCols));
  const size_t smem = sizeof(float) * static_cast<size_t>(a.kdim * (kGdrCols + 3));
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(gated_delta_rule_kernel<scalar_t>, grid, dim3(32 * kGdrWarps), smem, stream, a);
  });
}

}  // namespace octavo::cuda
