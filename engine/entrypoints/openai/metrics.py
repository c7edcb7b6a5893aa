"""Prometheus metrics for /metrics in a registry of the server's own: vLLM's series, with an
octavo: prefix.

The engine thread calls the StatsObserver methods (prometheus_client is thread-safe).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the server

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self._running = Gauge("octavo:num_requests_running", "Requests being computed.",
                              labels, registry=r)
        self._waiting = Gauge("octavo:num_requests_waiting", "Requests waiting to be scheduled.",
                              labels, registry=r)
        self._kv = Gauge("octavo:kv_cache_usage_perc",
                         "Share of KV-cache blocks in use (1 = full).", labels, registry=r)
        self._prompt = Counter("octavo:prompt_tokens", "Prompt tokens received.", labels,
                               registry=r)
        self._gen = Counter("octavo:generation_tokens", "Tokens generated.", labels, registry=r)
        self._ttft = Histogram("octavo:time_to_first_token_seconds",
                               "Seconds from arrival to the first generated token.", labels,
                               buckets=_TTFT_BUCKETS, registry=r)
        self._itl = Histogram("octavo:inter_token_latency_seconds",
                              "Seconds between a request's successive engine outputs.", labels,
                              buckets=_ITL_BUCKETS, registry=r)
        self._success = Counter("octavo:request_success",
                                "Finished sequences by finish reason (stop, length, abort, error).",
                                labels + ["finished_reason"], registry=r)
        self._free_blocks = Gauge("octavo:kv_cache_free_blocks",
                                  "KV-cache blocks free (cached prefixes that can be evicted "
                                  "count as free).", labels, registry=r)
        self._total_blocks = Gauge("octavo:kv_cache_total_blocks", "KV-cache blocks in all.",
                                   labels, registry=r)
        self._preemptions = Gauge("octavo:num_preemptions_total",
                                  "Requests preempted (recomputed later) since the start.",
                                  labels, registry=r)
        self._failed_steps = Counter("octavo:engine_failed_steps",
                                     "Engine steps that raised (their requests failed).",
                                     labels, registry=r)
        # speculative decoding (totals since the start; acceptance rate = accepted / draft)
        self._spec = {name: Counter(f"octavo:spec_decode_{name}", text, labels, registry=r)
                      for name, text in (
                          ("num_drafts", "Draft proposals verified (one per request and step)."),
                          ("num_draft_tokens", "Draft tokens verified."),
                          ("num_accepted_tokens", "Draft tokens the target accepted."))}
        self._spec_seen = {name: 0 for name in self._spec}
        self._model = model_name
        self._failed_steps.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(model_name, reason)
        self.on_step(0, 0, 0.0)             # so every series is there before the first request

    # StatsObserver (octavo.async_engine)
    def on_step(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self._running.labels(self._model).set(num_running)
        self._waiting.labels(self._model).set(num_waiting)
        self._kv.labels(self._model).set(kv_usage)

    def on_cache(self, num_free_blocks: int, num_blocks: int, num_preemptions: int) -> None:
        self._free_blocks.labels(self._model).set(num_free_blocks)
        self._total_blocks.labels(self._model).set(num_blocks)
        self._preemptions.labels(self._model).set(num_preemptions)

    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int,
                       num_accepted_tokens: int) -> None:
        for name, total in (("num_drafts", num_drafts), ("num_draft_tokens", num_draft_tokens),
                            ("num_accepted_tokens", num_accepted_tokens)):
            if total > self._spec_seen[name]:
                self._spec[name].labels(self._model).inc(total - self._spec_seen[name])
                self._spec_seen[name] = total

    def on_failed_step(self) -> None:
        self._failed_steps.labels(self._model).inc()

    def on_prompt_tokens(self, n: int) -> None:
        self._prompt.labels(self._model).inc(n)

    def on_new_tokens(self, n: int, first: bool, seconds: float) -> None:
        self._gen.labels(self._model).inc(n)
        (self._ttft if first else self._itl).labels(self._model).observe(seconds)

    def on_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
