// The csrc/cuda Mamba-1 launchers and kernels compiled as C++ for the SIMT emulator (a
// translation unit of its own beside kernels.cpp; no torch headers).
#include "cuda/mamba.cu"
