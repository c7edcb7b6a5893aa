"""octavo: a small vLLM-class inference engine (`from octavo import LLM, SamplingParams`)."""
import importlib
import os

# Spinning OpenMP workers are disastrous on a shared 2-core machine, so workers sleep when idle;
# but waking a sleeping worker costs tens of microseconds, and a decode step runs hundreds of
# short parallel ops back to back. A bounded spin (GOMP_SPINCOUNT iterations, a fraction of a
# millisecond; it overrides the passive policy's zero) keeps the workers awake within a step and
# lets them sleep between requests: batch-1 MoE decode ran 1.3-1.4x faster with it (bench/README).
# Both only take effect if torch is not imported yet; GOMP_SPINCOUNT=0 restores pure sleeping.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

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
