"""Where a step's time goes: `octavo bench latency --profile`.

The engine is not changed for this: while profiling, the methods that make up a step are
wrapped on their instances with wall-clock timers (restored afterwards), so an unprofiled
engine pays nothing. Sections of `LLMEngine.step()`:

  schedule        Scheduler.schedule
  prepare inputs  ModelRunner.prepare / _fill_host and the decode buffers' load
  forward         the model's forward (embedding to final norm)
  logits          compute_logits (lm_head) and the cast to float32
  sampling        Sampler.forward
  detokenize      IncrementalDetokenizer.update
  outputs         token bookkeeping and RequestOutput building, less detokenize
  sched update    Scheduler.update (stop checks, block bookkeeping)
  gap             the step's wall time less all of the above

A second pass runs torch's profiler around each forward and splits the forward by op type
(GEMMs, attention, norms, rotary, cache writes, activations, MoE, the rest), as shares of the
profiled forward applied to the unprofiled forward time (the profiler's own overhead inflates
small ops, so absolute profiled times are not quoted).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable

SECTIONS = ("schedule", "prepare inputs", "forward", "logits", "sampling", "detokenize",
            "outputs", "sched update", "gap")

# op name substrings -> category (first match wins); everything else is "other ops"
OP_CATEGORIES = (
    ("GEMM", ("::mm", "::addmm", "::bmm", "::matmul", "::linear", "linear_pointwise", "gemm",
              "lora_")),
    ("attention", ("attention", "scaled_dot_product")),
    ("norms", ("rms_norm", "layer_norm")),
    ("rotary", ("rotary",)),
    ("cache writes", ("reshape_and_cache", "concat_and_cache")),
    ("activation", ("silu", "gelu", "_and_mul")),
    ("MoE routing/experts", ("moe", "topk_routing")),
    ("state-space", ("conv1d", "selective_", "ssd_")),
)


def op_category(name: str) -> str:
    lowered = name.lower()
    for category, keys in OP_CATEGORIES:
        if any(k in lowered for k in keys):
            return category
    return "other ops"


class _Timers:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, section: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[section] += time.perf_counter() - start
        return timed


@contextmanager
def _patched(patches: list[tuple[Any, str, Callable]]):
    """Set obj.name = make(original) for each patch; restore on exit (instance attributes are
    deleted again, class attributes put back)."""
    undo = []
    try:
        for obj, name, make in patches:
            had_own = isinstance(obj, type) or name in getattr(obj, "__dict__", {})
            original = getattr(obj, name)
            setattr(obj, name, make(original))
            undo.append((obj, name, original, had_own))
        yield
    finally:
        for obj, name, original, had_own in reversed(undo):
            if had_own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)


def _runner(engine: Any) -> Any:
    runner = getattr(engine.executor, "runner", None)
    if runner is None:
        raise ValueError("--profile needs the in-process executor (tensor/pipeline parallel size 1)")
    return runner


def profile_steps(engine: Any, run_batch: Callable[[str], Any]) -> dict[str, Any]:
    """Run `run_batch(tag)` once with section timers and once with the op profiler; return
    per-step mean milliseconds of each section for decode steps and for steps with prefill,
    and the forward split by op type."""
    from octavo.detokenizer import IncrementalDetokenizer

    runner = _runner(engine)
    timers = _Timers()
    steps: list[tuple[bool, dict[str, float]]] = []
    scheduler = engine.scheduler
    graphs = getattr(runner, "decode_graphs", None)

    kinds: list[bool | None] = []         # per schedule() call: has prefill rows? (None: empty)

    def wrap_schedule(original):
        timed = timers.wrap("schedule", original)

        def schedule():
            out = timed()
            kinds.append(any(s.num_new_tokens > 1 for s in out.scheduled)
                         if out.scheduled else None)
            return out
        return schedule

    def wrap_step(original):
        def step():
            timers.current = defaultdict(float)
            kinds.clear()
            start = time.perf_counter()
            try:
                return original()
            finally:
                timers.current["step"] = time.perf_counter() - start
                if kinds and kinds[0] is not None:
                    steps.append((kinds[0], dict(timers.current)))
        return step

    model = runner.model
    patches = [
        (engine, "step", wrap_step),
        (scheduler, "schedule", wrap_schedule),
        (scheduler, "update", lambda f: timers.wrap("sched update", f)),
        (runner, "prepare", lambda f: timers.wrap("prepare inputs", f)),
        (runner, "_fill_host", lambda f: timers.wrap("prepare inputs", f)),
        (model, "forward", lambda f: timers.wrap("forward", f)),
        (model, "compute_logits", lambda f: timers.wrap("logits", f)),
        (engine.sampler, "forward", lambda f: timers.wrap("sampling", f)),
        (engine, "_process_token", lambda f: timers.wrap("outputs", f)),
        (engine, "_make_output", lambda f: timers.wrap("outputs", f)),
        (IncrementalDetokenizer, "update", lambda f: timers.wrap("detokenize", f)),
    ]
    if graphs is not None:
        patches.append((graphs.inputs, "load", lambda f: timers.wrap("prepare inputs", f)))
    with _patched(patches):
        run_batch("profile-timers")

    result: dict[str, Any] = {}
    for label, want_prefill in (("decode", False), ("prefill", True)):
        rows = [t for is_prefill, t in steps if is_prefill == want_prefill]
        if not rows:
            continue
        table = {}
        for section in SECTIONS[:-1]:
            table[section] = statistics.mean(r.get(section, 0.0) for r in rows) * 1e3
        table["outputs"] -= table["detokenize"]          # detokenize runs inside outputs
        step_ms = statistics.mean(r["step"] for r in rows) * 1e3
        table["gap"] = step_ms - sum(table[s] for s in SECTIONS[:-1])
        result[label] = {"steps": len(rows), "step_ms": step_ms, "sections_ms": table}

    result["forward_ops"] = _forward_ops(model, run_batch, result)
    return result


def _forward_ops(model: Any, run_batch: Callable[[str], Any], result: dict) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    self_us: dict[str, float] = defaultdict(float)
    other_us: dict[str, float] = defaultdict(float)

    def wrap(original):
        def forward(*args, **kwargs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = original(*args, **kwargs)
            for evt in prof.key_averages():
                category = op_category(evt.key)
                self_us[category] += evt.self_cpu_time_total
                if category == "other ops":
                    other_us[evt.key] += evt.self_cpu_time_total
            return out
        return forward

    with _patched([(model, "forward", wrap)]), torch.inference_mode():
        run_batch("profile-ops")
    total = sum(self_us.values())
    shares = {k: v / total for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])} if total else {}
    top_other = sorted(other_us.items(), key=lambda kv: -kv[1])[:6]
    out: dict[str, Any] = {"shares": shares,
                           "top_other_ops": {k: v / total for k, v in top_other} if total else {}}
    if "decode" in result:
        fwd = result["decode"]["sections_ms"]["forward"]
        out["decode_forward_ms_by_op"] = {k: s * fwd for k, s in shares.items()}
    return out


def print_profile(profile: dict[str, Any]) -> None:
    for label in ("decode", "prefill"):
        if label not in profile:
            continue
        p = profile[label]
        print(f"\n{label} steps: {p['steps']}, mean step {p['step_ms']:.3f} ms")
        for section in SECTIONS:
            ms = p["sections_ms"][section]
            print(f"  {section:<15} {ms:9.3f} ms  {100 * ms / p['step_ms']:5.1f}%")
    ops = profile.get("forward_ops", {})
    if ops.get("shares"):
        print("\nforward by op type (share of the profiled forward"
              + (", applied to the decode forward)" if "decode_forward_ms_by_op" in ops else ")"))
        for k, share in ops["shares"].items():
            ms = ops.get("decode_forward_ms_by_op", {}).get(k)
            print(f"  {k:<20} {100 * share:5.1f}%" + (f"  {ms:8.3f} ms" if ms is not None else ""))
        if ops.get("top_other_ops"):
            print("  other ops, largest: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in ops["top_other_ops"].items()))
