// The csrc/cuda gated delta rule compiled as C++ for the SIMT emulator (a translation unit of
// its own beside kernels.cpp; no torch headers).
#include "cuda/gated_delta_rule.cu"
