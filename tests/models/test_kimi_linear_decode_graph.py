"""Kimi-Linear's decode step is CUDA-graph capturable: one padded decode step of a tiny model, run
through the runner's static decode buffers on the meta device, makes no host sync, no
data-dependent shape and calls only octavo ops that have a CUDA kernel (no GPU needed)."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from test_kimi_linear_parity import KIMI
from octavo.decode_graphs import StaticDecodeInputs
from octavo.models.kimi_linear import KimiDeltaAttention, KimiLinearForCausalLM
from octavo.models.layers.cache_spec import CacheLayer, StateSpec
from octavo.models.layers.custom_op import native_ops

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises on every op that a CUDA graph cannot capture: a value read on the host
    (.item(), int(t), bool(t), .tolist()), an output whose shape depends on values (nonzero,
    boolean masks, unique) or a copy to the CPU. Records the octavo ops it sees."""

    def __init__(self):
        super().__init__()
        self.octavo_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("octavo::"):
            self.octavo_ops.add(name.split("::")[1])
        if torch.Tag.data_dependent_output in func.tags:
            raise HostSyncError(f"{name} reads a tensor's value on the host")
        if torch.Tag.dynamic_output_shape in func.tags and not _integer_index(func, args):
            raise HostSyncError(f"{name} has an output shape that depends on tensor values")
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            raise HostSyncError(f"{name} copies a tensor to the CPU")
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu"
               for t in tree_leaves((args, kwargs, out))):
            raise HostSyncError(f"{name} moves data between the CPU and the device")
        return out


def _integer_index(func, args) -> bool:
    # x[int_tensor] has a static shape (a gather); x[bool_mask] does not
    if func is not torch.ops.aten.index.Tensor:
        return False
    return all(i is None or i.dtype not in (torch.bool, torch.uint8) for i in args[1])


def _cuda_registered_ops() -> set[str]:
    ops = set()
    for src in CSRC.rglob("*.cpp"):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(octavo, CUDA, m\) \{(.*?)\n\}",
                                src.read_text(), re.S):
            ops.update(re.findall(r'm\.impl\("(\w+)"', block))
    return ops


def _meta_model(dtype: torch.dtype, **overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model("kimi_linear", architectures=["KimiLinearForCausalLM"],
                                  vocab_size=320, **{**KIMI, **overrides})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = KimiLinearForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for module in model.modules():            # as the runner does after loading
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    meta = torch.device("meta")
    for module in model.modules():
        if isinstance(module, CacheLayer):
            spec = module.cache_spec()
            module.bind_cache(spec.allocate_slots(9, dtype, meta) if isinstance(spec, StateSpec)
                              else spec.allocate(16, 16, dtype, meta))
    return model.eval()


def _decode_step(model, bs: int = 4):
    # the buffers and metadata DecodeGraphs.capture records the graph from; no_grad rather than
    # capture's inference_mode, under which .item() bypasses Python dispatch modes
    inputs = StaticDecodeInputs(8, 4, torch.device("meta"))
    ids, pos, md = inputs.view(bs, 64)
    with torch.no_grad():
        return model(ids, pos, md)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_step_has_no_host_sync(dtype):
    model = _meta_model(dtype)
    with NoHostSync() as mode:
        hidden = _decode_step(model)
    assert hidden.shape == (4, KIMI["hidden_size"]) and hidden.dtype == dtype
    # the kernels, not their references, ran: KDA's conv and delta rule, MLA, the MoE
    assert {"causal_conv1d_update", "gated_delta_rule", "mla_paged_attention",
            "reshape_and_cache", "topk_routing", "fused_moe"} <= mode.octavo_ops
    missing = mode.octavo_ops - _cuda_registered_ops()
    assert not missing, f"octavo ops without a CUDA kernel in the decode step: {missing}"
    assert getattr(KimiLinearForCausalLM, "cuda_graphs", True)


def test_the_check_catches_host_syncs(monkeypatch):
    """The same step through the plain-PyTorch references (which walk sequences on the host),
    with a branch on a tensor value and with a boolean-mask read injected into KDA: all refused."""
    model = _meta_model(torch.bfloat16)
    with native_ops(), pytest.raises(HostSyncError), NoHostSync():
        _decode_step(model)
    gate = KimiDeltaAttention._forget_gate

    def branchy(self, hidden):
        g = gate(self, hidden)
        return g if bool((g < 0).any()) else -g

    monkeypatch.setattr(KimiDeltaAttention, "_forget_gate", branchy)
    with pytest.raises(HostSyncError, match="host"), NoHostSync():
        _decode_step(model)

    def masked(self, hidden):
        g = gate(self, hidden)
        return g - g[g > -1e-3].sum()      # a boolean-mask read: its length depends on values

    monkeypatch.setattr(KimiDeltaAttention, "_forget_gate", masked)
    with pytest.raises(HostSyncError, match="shape"), NoHostSync():
        _decode_step(model)


def test_cuda_registration_scan_sees_the_kernels():
    ops = _cuda_registered_ops()
    assert {"gated_delta_rule", "causal_conv1d_update", "fused_moe", "rms_norm"} <= ops
    assert "linear_packed" not in ops          # a CPU-only op
