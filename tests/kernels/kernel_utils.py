"""Shared helpers for the kernel tests: the same-precision tolerance rule (STYLE habit 9)."""
import torch

DTYPES = [torch.float32, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, native: torch.Tensor, exact: torch.Tensor,
                        factor: float = 2.0, rtol: float = 1e-5, what: str = "") -> None:
    """The kernel's error vs the exact (fp64) reference must be at most `factor` times the error
    of the PyTorch reference run in the kernel's dtype, plus rtol * max|exact|."""
    assert out.shape == exact.shape, (out.shape, exact.shape)
    err, native_err = max_err(out, exact), max_err(native, exact)
    slack = rtol * (exact.double().abs().max().item() if exact.numel() else 0.0) + 1e-6
    assert err <= factor * native_err + slack, (
        f"{what}: kernel error {err:.3g} > {factor} x native error {native_err:.3g} + {slack:.3g}")
