// The csrc/cuda rejection sampler compiled as C++ for the SIMT emulator (a translation unit of
// its own beside kernels.cpp; no torch headers).
#include "cuda/rejection.cu"
