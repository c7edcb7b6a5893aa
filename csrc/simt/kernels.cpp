// The csrc/cuda launchers and kernels compiled as C++ for the SIMT emulator (one translation
// unit, no torch headers): g++ -DOCTAVO_SIMT turns the CUDA spellings into simt/simt.h.
#include "cuda/activation.cu"
#include "cuda/attention.cu"
#include "cuda/cache.cu"
#include "cuda/layernorm.cu"
#include "cuda/pos_encoding.cu"
#include "simt/selftest.cu"
