// Launcher of the Mamba-2 SSD kernel (ssd.cuh), for prefill (query_start_loc) and decode (none).
#include "cuda/ssd.cuh"

namespace octavo::cuda {

template <typename T, typename S>
static void launch_ssd_t(const SsdArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((a.head_dim + kSsdWarps - 1) / kSsdWarps));
  const dim3 block(32 * kSsdWarps);
  if (a.dstate <= 32) launch(ssd_scan_kernel<T, S, 1>, grid, block, 0, stream, a);
  else if (a.dstate <= 64) launch(ssd_scan_kernel<T, S, 2>, grid, block, 0, stream, a);
  else if (a.dstate <= 128) launch(ssd_scan_kernel<T, S, 4>, grid, block, 0, stream, a);
  else launch(ssd_scan_kernel<T, S, 8>, grid, block, 0, stream, a);
}

bool launch_ssd(const SsdArgs& a, cudaStream_t stream) {
  if (a.dstate > kSsdMaxState) return false;
  if (a.num_seqs == 0 || a.head_dim == 0 || a.heads == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (a.state_float) launch_ssd_t<scalar_t, float>(a, stream);
    else launch_ssd_t<scalar_t, scalar_t>(a, stream);
  });
}

}  // namespace octavo::cuda
