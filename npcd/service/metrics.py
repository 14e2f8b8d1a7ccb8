"""Prometheus metrics on prometheus-client, served by the library's own HTTP server on its own thread.

The daemon has four kinds of numbers, all in one `CollectorRegistry` per
`Metrics` (several daemons run in one test process; the library's global
registry would merge them, and refuse the second one's names):

- what the servicer observes per request: prometheus-client histograms and
  labelled counters;
- what the engine already counts (queue depth, batch size, tokens, steps, ...):
  read from `EngineStats` at scrape time by a collector, so the decode loop
  never keeps a second copy of any number;
- a tokens/s gauge over a short window, also computed at scrape time (kept
  hand-written: the library has no windowed rate, and `npcd_tokens_per_second`
  is a name dashboards already use);
- `npcd_engine_info`: the resolved fast path from `backend.describe()`, plus
  the library's process and platform metrics.

The exported names are the ones the hand-written exposition had (the load-test
scraper and dashboards read them); new are `npcd_engine_info`,
`npcd_engine_step_failures_total` and the process and platform metrics.

The library costs more than the hand-written exposition did (measured: an
inter-token observation 2.5 us against 1.3, a finished request 9 us against
2.3, a scrape 1.0 ms against 0.3 with the process metrics now in it), but a
decode step of 32 sequences pays about 40 us more of event-loop time for a step
of tens of milliseconds, so the library serves them all.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from npcd.engine.api import EngineStats

# A `_created` timestamp per counter and histogram doubles the series and nothing here reads it; the exposition
# before prometheus-client had none. The switch is process-wide, and npcd is the only user of the library here.
disable_created_metrics()

# Seconds. Time to first token spans queueing plus a prefill; inter-token gaps are one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TOKENS_WINDOW_S = 10.0

# (metric name, EngineStats field, help). Counter names are given without `_total`: the library appends it.
ENGINE_GAUGES = (
    ("npcd_queue_depth", "queue_depth", "Requests waiting for a batch slot."),
    ("npcd_running_requests", "running", "Requests in the running batch."),
    ("npcd_batch_size", "last_batch_size", "Sequences in the last engine step (0 while idle)."),
    ("npcd_max_batch_size", "max_batch_size", "Batch slots."),
    ("npcd_adapters_resident", "adapters_resident", "LoRA adapters held in the weight stacks."),
    ("npcd_adapters_known", "adapters_known", "LoRA adapters loaded by name."),
)
ENGINE_COUNTERS = (
    ("npcd_tokens_generated", "tokens_generated", "Completion tokens generated."),
    ("npcd_prompt_tokens", "prompt_tokens", "Prompt tokens prefilled (cache hits excluded)."),
    ("npcd_prefix_cache_hits", "prefix_cache_hits", "Persona prefixes served from the cache."),
    ("npcd_prefix_cache_misses", "prefix_cache_misses", "Persona prefixes prefilled."),
    ("npcd_engine_steps", "steps", "Engine steps."),
    ("npcd_engine_step_failures", "step_failures", "Engine steps that raised."),
)


def engine_labels(described: Mapping[str, object]) -> dict[str, str]:
    """`backend.describe()` as info labels: every value a string, the kernels dict flattened to kernel_<part>."""
    labels = {key: str(value) for key, value in described.items() if key != "kernels"}
    kernels = described.get("kernels") or {}
    assert isinstance(kernels, Mapping), f"describe()['kernels'] must be a dict, got {kernels!r}"
    labels.update({f"kernel_{part}": str(kernel) for part, kernel in kernels.items()})
    return labels


class _EngineCollector(Collector):
    """The engine's own counters and gauges, read once per scrape."""

    def __init__(self, stats: Callable[[], EngineStats], tokens_per_second: Callable[[], float]):
        self._stats = stats
        self._tokens_per_second = tokens_per_second

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, field, help_text in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(s, field))
        for name, field, help_text in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(s, field))
        yield GaugeMetricFamily("npcd_tokens_per_second",
                                f"Completion tokens per second over the last {TOKENS_WINDOW_S:g} s.",
                                value=self._tokens_per_second())


class Metrics:
    """Everything /metrics shows. `stats` reads the engine's counters at scrape time; `engine` is its describe()."""

    def __init__(self, stats: Callable[[], EngineStats], engine: Mapping[str, object],
                 clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (finished at, completion tokens)
        self.registry.register(_EngineCollector(stats, self.tokens_per_second))
        self.finished = Counter("npcd_requests_finished", "Requests finished, by reason.", ["reason"],
                                registry=self.registry)
        self.unread = Counter("npcd_lines_unread_cancelled", "Lines cancelled because their reader stopped "
                              "reading (more unread events than the bound).", registry=self.registry)
        self.rejected = Counter("npcd_requests_rejected", "Requests refused before running, by gRPC status.",
                                ["status"], registry=self.registry)
        self.ttft = Histogram("npcd_time_to_first_token_seconds",
                              "Time from handing a request to the engine to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("npcd_inter_token_seconds", "Time between two text deltas of one request.",
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        Info("npcd_engine", "The resolved fast path: device, weights mode and why, dtype, kernels, prefill policy, threads.",
             registry=self.registry).info(engine_labels(engine))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def request_finished(self, reason: str, completion_tokens: int, first_token_ms: float) -> None:
        now = self._clock()
        if completion_tokens and first_token_ms > 0:
            self.ttft.observe(first_token_ms / 1000.0)
        self.finished.labels(reason=reason).inc()
        with self._lock:
            self._recent.append((now, completion_tokens))
            self._trim(now)

    def request_rejected(self, status: str) -> None:
        self.rejected.labels(status=status).inc()

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - TOKENS_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Completion tokens of requests that finished in the last TOKENS_WINDOW_S seconds, per second."""
        with self._lock:
            self._trim(self._clock())
            return sum(n for _, n in self._recent) / TOKENS_WINDOW_S


class MetricsServer:
    """GET /metrics on prometheus-client's threaded HTTP server; scrapes never touch the event loop.

    `address` is HOST:PORT; port 0 binds a free port, and `.address` (once
    started) says which. The library answers every path with the metrics.
    """

    def __init__(self, metrics: Metrics, address: str):
        self._registry = metrics.registry
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._httpd is not None, "the metrics server is not started"
        host, port = self._httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def start(self) -> None:
        self._httpd, self._thread = start_http_server(self._port, addr=self._host, registry=self._registry)

    def stop(self) -> None:
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
