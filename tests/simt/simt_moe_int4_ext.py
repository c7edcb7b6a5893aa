"""Builds (once, cached under build/simt-moe-int4) and loads the emulated fused MoE over 4-bit
experts of csrc/cuda as torch.ops.octavo_simt.fused_moe_int4_packed: an extension of its own
beside simt_ext's (same emulator runtime; moe_align from the MoE kernels' translation unit)."""
import functools
import os

import torch

import simt_ext

SOURCES = ["runtime.cpp", "moe_kernels.cpp", "moe_int4_kernels.cpp", "torch_ops_simt_moe_int4.cpp"]


@functools.cache
def load():
    from torch.utils import cpp_extension
    build_dir = simt_ext.ROOT / "build" / "simt-moe-int4"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="octavo_simt_moe_int4",
                       sources=[str(simt_ext.CSRC / "simt" / s) for s in SOURCES],
                       extra_include_paths=[str(simt_ext.CSRC)],
                       extra_cflags=["-std=c++20", "-DOCTAVO_SIMT", "-Wall", "-Wextra", "-Werror", "-O2"],
                       build_directory=str(build_dir), is_python_module=False,
                       verbose=os.environ.get("OCTAVO_SIMT_VERBOSE") == "1")
    return torch.ops.octavo_simt
