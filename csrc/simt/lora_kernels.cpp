// The csrc/cuda LoRA launchers and kernels compiled as C++ for the SIMT emulator (a translation
// unit of its own beside kernels.cpp; no torch headers).
#include "cuda/lora.cu"
