// Self-test kernels for the SIMT emulator: each exercises one CUDA feature so that tests can
// compare it with the documented semantics. Plain CUDA: nvcc compiles this file too.
#include "cuda/ptx.cuh"
#include "simt/selftest.h"

namespace octavo::simt_selftest {
namespace k {

// mode 0: correct; 1: __syncthreads after some threads returned; 2: two __syncthreads sites;
// 3: a lane calls a shuffle whose mask leaves it out; 4: a shuffle mask names exited lanes.
__global__ void sync_kernel(int mode, int32_t* out) {
  __shared__ int seen[64];
  seen[threadIdx.x] = threadIdx.x;
  if (mode == 3 && threadIdx.x == 0) out[0] = __shfl_sync(0x2u, 1, 1);
  if (mode == 4 && threadIdx.x % 32 >= 16) return;
  if (mode == 4) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  if (mode == 1 && threadIdx.x >= 16) return;
  if (mode == 2 && threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = seen[(threadIdx.x + 1) % blockDim.x];
}

__global__ void shuffle_kernel(float* out, const float* x, int kind, int arg, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[i];
  float r;
  if (kind == 0) r = __shfl_sync(0xffffffffu, v, arg, width);
  else if (kind == 1) r = __shfl_up_sync(0xffffffffu, v, arg, width);
  else if (kind == 2) r = __shfl_down_sync(0xffffffffu, v, arg, width);
  else if (kind == 3) r = __shfl_xor_sync(0xffffffffu, v, arg, width);
  else {  // butterfly sum of the warp, the reduction every norm kernel uses
    r = v;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  }
  out[i] = r;
}

__global__ void vote_kernel(int32_t* out, const int32_t* pred, uint32_t mask) {
  const int l = threadIdx.x;
  // Lanes outside `mask` vote among themselves, so both halves must complete independently.
  const uint32_t m = (mask >> l & 1u) ? mask : ~mask;
  if (m == 0) return;
  out[l * 3 + 0] = static_cast<int32_t>(__ballot_sync(m, pred[l]));
  out[l * 3 + 1] = __any_sync(m, pred[l]);
  out[l * 3 + 2] = __all_sync(m, pred[l]);
}

__global__ void poison_kernel(uint32_t* out) {
  __shared__ float tile[4];
  OCTAVO_DYNAMIC_SHARED(uint32_t, dyn);
  if (threadIdx.x == 0) {
    uint32_t bits;
    memcpy(&bits, &tile[1], 4);
    out[blockIdx.x * 2] = bits;
    out[blockIdx.x * 2 + 1] = dyn[3];
    tile[1] = 1.f;  // the next block must not see this
    dyn[3] = 7;
  }
}

__global__ void mma_kernel(float* d, const uint16_t* a, const uint16_t* b, const float* c, bool bf16) {
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  uint32_t af[4], bf[2];
  float cf[4], df[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    af[r] = a[row * 16 + col] | (uint32_t(a[row * 16 + col + 1]) << 16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k0 = 2 * t + 8 * r;
    bf[r] = b[k0 * 8 + g] | (uint32_t(b[(k0 + 1) * 8 + g]) << 16);
  }
  for (int i = 0; i < 4; ++i) cf[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if (bf16) cuda::mma_m16n8k16_bf16(df, af, bf, cf);
  else cuda::mma_m16n8k16_f16(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = df[i];
}

// m: 4 matrices of 8x8 b16, row-major; each lane copies one 16-byte row into shared memory.
__global__ void ldmatrix_kernel(uint32_t* out, const uint16_t* m, int num, bool trans, bool wait) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const int l = threadIdx.x;
  cuda::cp_async_16(&tile[l][0], m + l * 8);
  cuda::cp_async_commit();
  if (wait) cuda::cp_async_wait<0>();
  __syncwarp();
  uint32_t r[4] = {0, 0, 0, 0};
  const void* row = &tile[l][0];
  if (num == 1 && !trans) cuda::ldmatrix_x1(reinterpret_cast<uint32_t(&)[1]>(r), row);
  if (num == 2 && !trans) cuda::ldmatrix_x2(reinterpret_cast<uint32_t(&)[2]>(r), row);
  if (num == 4 && !trans) cuda::ldmatrix_x4(r, row);
  if (num == 1 && trans) cuda::ldmatrix_x1_trans(reinterpret_cast<uint32_t(&)[1]>(r), row);
  if (num == 2 && trans) cuda::ldmatrix_x2_trans(reinterpret_cast<uint32_t(&)[2]>(r), row);
  if (num == 4 && trans) cuda::ldmatrix_x4_trans(r, row);
  for (int j = 0; j < num; ++j) out[l * num + j] = r[j];
  cuda::cp_async_wait_all();
}

// ints: [count, max, min, cas_count, or_bits]; sum: float sum of 0.5 per thread
__global__ void atomics_kernel(long long* ints, float* sum) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(reinterpret_cast<unsigned long long*>(&ints[0]), 1ull);
  atomicMax(&ints[1], static_cast<long long>(i));
  atomicMin(&ints[2], static_cast<long long>(i));
  unsigned long long* cas = reinterpret_cast<unsigned long long*>(&ints[3]);
  unsigned long long old = *cas, seen;
  while ((seen = atomicCAS(cas, old, old + 1)) != old) old = seen;
  atomicOr(reinterpret_cast<unsigned long long*>(&ints[4]), 1ull << (i % 64));
  atomicAdd(sum, 0.5f);
}

}  // namespace k

void divergent_sync(int32_t* out, int mode) {
  cuda::launch(k::sync_kernel, dim3(1), dim3(64), 0, nullptr, mode, out);
}

void shuffle(float* out, const float* x, int n, int kind, int arg, int width) {
  cuda::launch(k::shuffle_kernel, dim3(n / 64), dim3(64), 0, nullptr, out, x, kind, arg, width);
}

void votes(int32_t* out, const int32_t* pred, uint32_t mask) {
  cuda::launch(k::vote_kernel, dim3(1), dim3(32), 0, nullptr, out, pred, mask);
}

void shared_poison(uint32_t* out, int blocks) {
  cuda::launch(k::poison_kernel, dim3(blocks), dim3(32), 64, nullptr, out);
}

void mma(float* d, const uint16_t* a, const uint16_t* b, const float* c, bool bf16) {
  cuda::launch(k::mma_kernel, dim3(1), dim3(32), 0, nullptr, d, a, b, c, bf16);
}

void ldmatrix(uint32_t* out, const uint16_t* m, int num, bool trans, bool wait) {
  cuda::launch(k::ldmatrix_kernel, dim3(1), dim3(32), 0, nullptr, out, m, num, trans, wait);
}

void atomics(int64_t* ints, float* sum, int blocks, int threads) {
  cuda::launch(k::atomics_kernel, dim3(blocks), dim3(threads), 0, nullptr,
               reinterpret_cast<long long*>(ints), sum);
}

}  // namespace octavo::simt_selftest
