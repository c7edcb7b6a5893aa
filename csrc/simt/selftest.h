// Launchers of the emulator's self-test kernels (selftest.cu): raw pointers, no torch.
#pragma once

#include <cstdint>

namespace octavo::simt_selftest {

void divergent_sync(int32_t* out, int mode);  // out [64]; modes: selftest.cu sync_kernel
void shuffle(float* out, const float* x, int n, int kind, int arg, int width);
void votes(int32_t* out, const int32_t* pred, uint32_t mask);  // out: [32, 3]
void shared_poison(uint32_t* out, int blocks);            // out: [blocks, 2]
void mma(float* d, const uint16_t* a, const uint16_t* b, const float* c, bool bf16);
void ldmatrix(uint32_t* out, const uint16_t* m, int num, bool trans, bool wait);
void atomics(int64_t* ints, float* sum, int blocks, int threads);

}  // namespace octavo::simt_selftest
