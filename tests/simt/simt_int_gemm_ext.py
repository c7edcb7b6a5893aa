"""Builds (once, cached under build/simt-int-gemm) and loads the emulated INT4 / INT8 GEMM
kernels of csrc/cuda as torch.ops.octavo_simt.{int4_gemm, int8_gemm}: an extension of its own
beside simt_ext's (same emulator runtime, only these kernels), shared by both test files."""
import functools
import os

import torch

import simt_ext

SOURCES = ["runtime.cpp", "int_gemm_kernels.cpp", "torch_ops_simt_int_gemm.cpp"]


@functools.cache
def load():
    from torch.utils import cpp_extension
    build_dir = simt_ext.ROOT / "build" / "simt-int-gemm"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="octavo_simt_int_gemm",
                       sources=[str(simt_ext.CSRC / "simt" / s) for s in SOURCES],
                       extra_include_paths=[str(simt_ext.CSRC)],
                       extra_cflags=["-std=c++20", "-DOCTAVO_SIMT", "-Wall", "-Wextra", "-Werror", "-O2"],
                       build_directory=str(build_dir), is_python_module=False,
                       verbose=os.environ.get("OCTAVO_SIMT_VERBOSE") == "1")
    return torch.ops.octavo_simt
