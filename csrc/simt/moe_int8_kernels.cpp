// The csrc/cuda fused MoE over weight-only int8 experts compiled as C++ for the SIMT emulator (a
// translation unit of its own; moe_align comes from moe_kernels.cpp; no torch headers).
#include "cuda/moe_int8.cu"
