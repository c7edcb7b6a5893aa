"""Base class of layers that have a kernel path (octavo.ops) and a plain-PyTorch reference.

`forward` runs `forward_ops` unless `use_native` is set on the instance, its class or CustomOp
itself (e.g. `CustomOp.use_native = True` switches every layer to `forward_native`).
"""
from __future__ import annotations

import contextlib

from torch import nn


class CustomOp(nn.Module):
    use_native: bool = False

    def forward(self, *args, **kwargs):
        if self.use_native or CustomOp.use_native:
            return self.forward_native(*args, **kwargs)
        return self.forward_ops(*args, **kwargs)

    def forward_ops(self, *args, **kwargs):
        raise NotImplementedError

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError


@contextlib.contextmanager
def native_ops(enabled: bool = True):
    """Run every CustomOp through its plain-PyTorch reference inside the block."""
    previous = CustomOp.use_native
    CustomOp.use_native = enabled
    try:
        yield
    finally:
        CustomOp.use_native = previous
