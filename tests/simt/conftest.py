"""The emulator tests share tests/kernels' tolerance helpers (kernel_utils)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kernels"))
