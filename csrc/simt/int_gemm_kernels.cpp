// The csrc/cuda INT4 / INT8 GEMM launchers and kernels compiled as C++ for the SIMT emulator (a
// translation unit of their own; no torch headers).
#include "cuda/int4_gemm.cu"
#include "cuda/int8_gemm.cu"
