"""octavo: a small vLLM-class inference engine (`from octavo import LLM, SamplingParams`)."""
import importlib
import os

# Spinning OpenMP workers are disastrous on a shared 2-core machine, so workers sleep when idle;
# but waking a sleeping worker costs tens of microseconds, and a decode step runs hundreds of
# short parallel ops back to back. A bounded spin (GOMP_SPINCOUNT iterations, a fraction of a
# millisecond; it overrides the passive policy's zero) keeps the workers awake within a step and
# lets them sleep between requests: batch-1 MoE decode ran 1.3-1.4x faster with it (bench/README).
# Both only take effect if torch is not imported yet; GOMP_SPINCOUNT=0 restores pure sleeping.
def _warn_if_torch_came_first() -> None:
    """With torch (and so libgomp) loaded before octavo and OMP_WAIT_POLICY=PASSIVE already set, the
    spin count below cannot take effect and OpenMP workers sleep after every op: the small Llama's
    32 x 128/128 run took 1.4x as long on the 2-core Xeon (bench/README, 2026-12-04). Say how to
    get it back."""
    import sys
    if ("torch" in sys.modules and "GOMP_SPINCOUNT" not in os.environ
            and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"):
        import warnings
        warnings.warn("octavo: torch was imported before octavo with OMP_WAIT_POLICY=PASSIVE, so "
                      "OpenMP workers sleep between operations (decode up to 1.4x slower); import "
                      "octavo before torch, or set GOMP_SPINCOUNT=20000 before starting Python "
                      "(GOMP_SPINCOUNT=0 keeps them sleeping and silences this)",
                      RuntimeWarning, stacklevel=3)


_warn_if_torch_came_first()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")


def _keep_freed_memory() -> None:
    """glibc serves every allocation over 32 MiB (a prefill's MLP activations) with a fresh mmap
    and unmaps it on free, so each one is faulted in page by page again (first-touch writes ran
    at a quarter of the copy bandwidth here; a 2040-token prefill of an 850M Llama paid about a
    second for it on its first run and 5% on every later one). Like the tcmalloc that vLLM's CPU
    backend preloads, octavo keeps freed memory for reuse instead: no mmap'd chunks, no trimming.
    Skipped where the user tunes malloc (MALLOC_* variables), preloads another allocator, or sets
    OCTAVO_KEEP_FREED_MEMORY=0; only on glibc."""
    if os.environ.get("OCTAVO_KEEP_FREED_MEMORY", "1") == "0" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)                     # every chunk from the heap, reused after free
    mallopt(m_trim_threshold, 2 ** 31 - 1)     # and the heap's free top kept, up to 2 GiB


_keep_freed_memory()

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
