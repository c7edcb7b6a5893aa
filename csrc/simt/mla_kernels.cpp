// The csrc/cuda MLA launcher and kernel compiled as C++ for the SIMT emulator (a translation unit
// of its own beside kernels.cpp; no torch headers).
#include "cuda/mla.cu"
