// The csrc/cuda FP8 GEMM launcher and kernels compiled as C++ for the SIMT emulator (a
// translation unit of its own; no torch headers).
#include "cuda/fp8_gemm.cu"
