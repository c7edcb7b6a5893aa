"""Builds (once, cached under build/simt-int8-woq) and loads the emulated weight-only INT8 GEMM
and fused MoE over int8 experts of csrc/cuda as torch.ops.octavo_simt.{int8_woq_gemm,
fused_moe_int8_packed}: an extension of its own beside simt_ext's (same emulator runtime, only
these kernels; moe_align from the MoE kernels' translation unit)."""
import functools
import os

import torch

import simt_ext

SOURCES = ["runtime.cpp", "moe_kernels.cpp", "int8_woq_kernels.cpp", "moe_int8_kernels.cpp",
           "torch_ops_simt_int8_woq.cpp", "torch_ops_simt_moe_int8.cpp"]


@functools.cache
def load():
    from torch.utils import cpp_extension
    build_dir = simt_ext.ROOT / "build" / "simt-int8-woq"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="octavo_simt_int8_woq",
                       sources=[str(simt_ext.CSRC / "simt" / s) for s in SOURCES],
                       extra_include_paths=[str(simt_ext.CSRC)],
                       extra_cflags=["-std=c++20", "-DOCTAVO_SIMT", "-Wall", "-Wextra", "-Werror", "-O2"],
                       build_directory=str(build_dir), is_python_module=False,
                       verbose=os.environ.get("OCTAVO_SIMT_VERBOSE") == "1")
    return torch.ops.octavo_simt
