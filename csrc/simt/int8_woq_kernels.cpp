// The csrc/cuda weight-only INT8 GEMM launcher and kernels compiled as C++ for the SIMT emulator
// (a translation unit of its own; no torch headers).
#include "cuda/int8_woq_gemm.cu"
