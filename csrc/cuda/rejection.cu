// Launcher of the rejection sampler (rejection.cuh); the grid depends on shapes only.
#include "cuda/rejection.cuh"

namespace octavo::cuda {

bool launch_rejection_sample(const RejectionArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return true;
  launch(rejection_sample_kernel, dim3(static_cast<unsigned>(a.batch)), dim3(kRejectionThreads),
         0, stream, a);
  return true;
}

}  // namespace octavo::cuda
