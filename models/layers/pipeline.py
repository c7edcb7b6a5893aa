"""Pipeline-parallel stages for the model files: the layers a stage builds (stand-ins for the
others), the one stage forward every model runs, and the driver's check of a model's support.

A model with pipeline parallelism keeps its decoder layers in a StageLayers and runs them with
run_stage. Its forward takes `intermediate`: None on the first stage (it embeds the tokens),
else the previous stage's state; on every stage but the last it returns its state, a tuple of
`pp_intermediate_tensors` tensors of [T, hidden_size] (Llama-like decoders: hidden and
residual; blocks that add their residual themselves, as Bloom and OPT: hidden alone), which the
worker sends on to the next stage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from octavo.models.layers.parallel_state import get_pp_rank, get_pp_size, pp_layer_range

State = tuple  # of tensors [T, hidden_size]; a residual may be None before the first layer


class PPMissingLayer(nn.Identity):
    """Stands in for a layer another pipeline stage holds: no weights, never called."""


class StageLayers(nn.ModuleList):
    """All num_layers slots of a model's decoder stack, in checkpoint order (so names keep their
    indices); only this stage's range [start_layer, end_layer) is built, the rest are
    PPMissingLayer. Without pipeline parallelism that range is every layer."""

    def __init__(self, num_layers: int, build: Callable[[int], nn.Module]):
        start, end = pp_layer_range(num_layers)
        super().__init__(build(i) if start <= i < end else PPMissingLayer()
                         for i in range(num_layers))
        self.start_layer, self.end_layer = start, end
        # read once: the stage is fixed when the model is built (the global may change later,
        # e.g. when one process builds several stages' models)
        self.is_last_stage = is_last_stage()

    def held(self) -> list[nn.Module]:
        """The layers this stage holds, in order."""
        return [self[i] for i in range(self.start_layer, self.end_layer)]


def is_last_stage() -> bool:
    return get_pp_rank() == get_pp_size() - 1


def run_stage(layers: StageLayers, intermediate: State | None, embed: Callable[[], State],
              step: Callable[[nn.Module, State], State],
              finish: Callable[[State], torch.Tensor],
              all_layers: Callable[[State], State] | None = None) -> torch.Tensor | State:
    """One pipeline stage's forward: the first stage starts from embed() (the others from the
    previous stage's state), each held layer maps the state with step(layer, state), or
    all_layers(state) maps it through all of them at once (decoder_plan.py); the last stage
    returns finish(state) (final norm -> hidden [T, hidden]), the others the state."""
    state = embed() if intermediate is None else tuple(intermediate)
    if all_layers is not None:
        state = tuple(all_layers(state))
    else:
        for layer in layers.held():
            state = step(layer, state)
    return finish(state) if layers.is_last_stage else state


def check_parallel_support(model_cls, hf_config, tp_size: int, pp_size: int) -> None:
    """ValueError naming the model and what to change when it cannot run on these ranks (run
    by the driver before any worker starts). A class declares supports_tensor_parallel (default
    True here; a model with per-request state layers must set it itself, or the model runner
    refuses it on each worker), supports_pipeline_parallel (default False), optionally
    pipeline_parallel_limit (why not) and, when its decoder layers are not
    config.num_hidden_layers, pp_layers_config_key (the config field that counts them)."""
    name = model_cls.__name__
    if tp_size > 1 and not getattr(model_cls, "supports_tensor_parallel", True):
        raise ValueError(f"{name} does not support tensor parallelism: use "
                         "tensor_parallel_size=1")
    if pp_size == 1:
        return
    if not getattr(model_cls, "supports_pipeline_parallel", False):
        reason = getattr(model_cls, "pipeline_parallel_limit", None)
        raise ValueError(f"{name} does not support pipeline parallelism"
                         f"{f' ({reason})' if reason else ''}: use pipeline_parallel_size=1 "
                         "(tensor_parallel_size splits its layers over ranks instead)")
    key = getattr(model_cls, "pp_layers_config_key", "num_hidden_layers")
    layers = getattr(hf_config, key, None)
    if isinstance(layers, int) and layers % pp_size:
        raise ValueError(f"{name} has {layers} decoder layers ({key}), which do not divide into "
                         f"pipeline_parallel_size={pp_size} stages: pick a divisor of {layers}")
