"""Gated activations: act(x[..., :D]) * x[..., D:] on the fused gate_up output."""
from __future__ import annotations

import torch

from octavo import ops, ops_native
from octavo.models.layers.custom_op import CustomOp


class SiluAndMul(CustomOp):
    def forward_ops(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2*D] -> [T, D]
        return ops.silu_and_mul(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return ops_native.silu_and_mul(x)


class GeluAndMul(CustomOp):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward_ops(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_and_mul(x, self.approximate)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return ops_native.gelu_and_mul(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


_GATED = {
    "silu": lambda: SiluAndMul(),
    "swish": lambda: SiluAndMul(),
    "gelu": lambda: GeluAndMul("none"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu_new": lambda: GeluAndMul("tanh"),
}


def get_gated_activation(hidden_act: str) -> CustomOp:
    """The fused act-and-mul for an HF `hidden_act` name."""
    if hidden_act not in _GATED:
        raise ValueError(f"unsupported hidden_act {hidden_act!r}; supported: {sorted(_GATED)}")
    return _GATED[hidden_act]()


# Plain (non-gated) activations of GPT-2 / OPT / BLOOM / StarCoder MLPs, elementwise through
# torch. gelu_new, gelu_fast, gelu_pytorch_tanh and BLOOM's gelu are all the tanh approximation.
_PLAIN = {
    "gelu": lambda: torch.nn.GELU(approximate="none"),
    "gelu_new": lambda: torch.nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: torch.nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "relu": lambda: torch.nn.ReLU(),
    "silu": lambda: torch.nn.SiLU(),
    "swish": lambda: torch.nn.SiLU(),
}


def get_act_fn(hidden_act: str) -> torch.nn.Module:
    """The elementwise activation for an HF `hidden_act` / `activation_function` name."""
    if hidden_act not in _PLAIN:
        raise ValueError(f"unsupported activation {hidden_act!r}; supported: {sorted(_PLAIN)}")
    return _PLAIN[hidden_act]()
