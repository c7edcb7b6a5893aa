// Launchers of the Mamba-1 kernels (mamba.cuh): causal conv1d (outputs, then final states) and
// the selective scan, each for prefill chunks and decode rows alike.
#include "cuda/mamba.cuh"

namespace octavo::cuda {

bool launch_causal_conv1d(const CausalConvArgs& a, cudaStream_t stream) {
  const unsigned yblocks = static_cast<unsigned>((a.dim + kMambaThreads - 1) / kMambaThreads);
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (a.dim == 0 || a.batch.num_seqs == 0) return;
    if (a.batch.num_tokens > 0)
      launch(causal_conv1d_out_kernel<scalar_t>, dim3(static_cast<unsigned>(a.batch.num_tokens), yblocks),
             dim3(kMambaThreads), 0, stream, a);
    if (a.width > 1)
      launch(causal_conv1d_state_kernel<scalar_t>, dim3(static_cast<unsigned>(a.batch.num_seqs), yblocks),
             dim3(kMambaThreads), 0, stream, a);
  });
}

template <typename T, int kNPer, int kG>
static void launch_scan(const SelectiveScanArgs& a, cudaStream_t stream) {
  constexpr int kChannels = kMambaThreads / kG;
  const dim3 grid(static_cast<unsigned>(a.batch.num_seqs),
                  static_cast<unsigned>((a.dim + kChannels - 1) / kChannels));
  launch(selective_scan_kernel<T, kNPer, kG>, grid, dim3(kMambaThreads), 0, stream, a);
}

// The fewest lanes per channel that hold N state columns, 4 per lane (8 past N = 128).
template <typename T>
static void launch_scan_t(const SelectiveScanArgs& a, cudaStream_t stream) {
  const int n = a.dstate;
  if (n <= 4) launch_scan<T, 4, 1>(a, stream);
  else if (n <= 8) launch_scan<T, 4, 2>(a, stream);
  else if (n <= 16) launch_scan<T, 4, 4>(a, stream);
  else if (n <= 32) launch_scan<T, 4, 8>(a, stream);
  else if (n <= 64) launch_scan<T, 4, 16>(a, stream);
  else if (n <= 128) launch_scan<T, 4, 32>(a, stream);
  else launch_scan<T, 8, 32>(a, stream);
}

bool launch_selective_scan(const SelectiveScanArgs& a, cudaStream_t stream) {
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    if (a.dim == 0 || a.batch.num_seqs == 0) return;
    launch_scan_t<scalar_t>(a, stream);
  });
}

}  // namespace octavo::cuda
