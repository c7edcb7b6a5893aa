"""octavo: a small vLLM-class inference engine (`from octavo import LLM, SamplingParams`)."""
import importlib
import os

# Spinning OpenMP workers are disastrous on a shared 2-core machine; this only
# takes effect if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# Public names, imported on first use so that `import octavo.ops` stays light.
_EXPORTS = {
    "LLM": "llm", "LLMEngine": "llm_engine", "EngineConfig": "config",
    "SamplingParams": "sampling_params", "RequestOutput": "outputs",
    "CompletionOutput": "outputs", "Logprob": "outputs",
    "BeamSearchParams": "beam_search",
    "EngineArgs": "arg_utils",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'octavo' has no attribute {name!r}")
