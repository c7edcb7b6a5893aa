// The csrc/cuda Mamba-2 SSD launcher and kernel compiled as C++ for the SIMT emulator (a
// translation unit of its own beside kernels.cpp; no torch headers).
#include "cuda/ssd.cu"
