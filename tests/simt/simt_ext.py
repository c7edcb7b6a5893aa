"""Builds (once, cached under build/simt) and loads the SIMT-emulated CUDA kernels: the
csrc/cuda launchers compiled by g++ -DOCTAVO_SIMT, registered as torch.ops.octavo_simt.*.

OCTAVO_SIMT_DEBUG=1 builds with -O0 -g (for gdb) into a separate cache directory."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = [CSRC / "simt" / "runtime.cpp", CSRC / "simt" / "kernels.cpp",
           CSRC / "simt" / "torch_ops_simt.cpp", CSRC / "simt" / "moe_kernels.cpp",
           CSRC / "simt" / "torch_ops_simt_moe.cpp", CSRC / "simt" / "mla_kernels.cpp",
           CSRC / "simt" / "torch_ops_simt_mla.cpp", CSRC / "simt" / "mamba_kernels.cpp",
           CSRC / "simt" / "torch_ops_simt_mamba.cpp",
           CSRC / "simt" / "ssd_kernels.cpp", CSRC / "simt" / "torch_ops_simt_ssd.cpp"]
SOURCES += [CSRC / "simt" / "lora_kernels.cpp", CSRC / "simt" / "torch_ops_simt_lora.cpp"]
SOURCES += [CSRC / "simt" / "rejection_kernels.cpp",
            CSRC / "simt" / "torch_ops_simt_rejection.cpp"]
SOURCES += [CSRC / "simt" / "gated_delta_rule_kernels.cpp",
            CSRC / "simt" / "torch_ops_simt_gated_delta_rule.cpp"]


@functools.cache
def load() -> object:
    """Returns torch.ops.octavo_simt after building the extension if a source changed."""
    from torch.utils import cpp_extension

    debug = os.environ.get("OCTAVO_SIMT_DEBUG") == "1"
    build_dir = ROOT / "build" / ("simt-debug" if debug else "simt")
    build_dir.mkdir(parents=True, exist_ok=True)
    opt = ["-O0", "-g"] if debug else ["-O2"]
    cpp_extension.load(
        name="octavo_simt_debug" if debug else "octavo_simt",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-std=c++20", "-DOCTAVO_SIMT", "-Wall", "-Wextra", "-Werror", *opt],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("OCTAVO_SIMT_VERBOSE") == "1",
    )
    return torch.ops.octavo_simt
