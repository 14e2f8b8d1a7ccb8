"""Prometheus metrics in the text exposition format, served by a tiny HTTP server.

We write the format ourselves (it is a dozen lines) rather than pull in a
client library: the daemon has three kinds of numbers, engine gauges read at
scrape time, per-request histograms observed by the server, and a tokens/s
rate over a short window, and all of them fit in one small class.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from npcd.backend import EngineStats

# Seconds. Time to first token spans queueing plus a prefill; inter-token gaps are one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TOKENS_WINDOW_S = 10.0


class Histogram:
    """A cumulative-bucket histogram; `observe` is called from the event loop, `render` from HTTP threads."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip([*map(_fmt, self.buckets), "+Inf"], counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {running}"]
        return lines


def _fmt(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Metrics:
    """Everything /metrics shows. `stats` reads the engine's counters at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], clock: Callable[[], float] = time.monotonic):
        self._stats = stats
        self._clock = clock
        self.ttft = Histogram("npcd_time_to_first_token_seconds",
                              "Time from handing a request to the engine to its first token.", TTFT_BUCKETS)
        self.inter_token = Histogram("npcd_inter_token_seconds",
                                     "Time between two text deltas of one request.", INTER_TOKEN_BUCKETS)
        self._lock = threading.Lock()
        self._finished: collections.Counter[str] = collections.Counter()
        self._rejected: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def request_finished(self, reason: str, completion_tokens: int, first_token_ms: float) -> None:
        now = self._clock()
        if completion_tokens and first_token_ms > 0:
            self.ttft.observe(first_token_ms / 1000.0)
        with self._lock:
            self._finished[reason] += 1
            self._recent.append((now, completion_tokens))
            self._trim(now)

    def request_rejected(self, status: str) -> None:
        with self._lock:
            self._rejected[status] += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - TOKENS_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Completion tokens of requests that finished in the last TOKENS_WINDOW_S seconds, per second."""
        with self._lock:
            self._trim(self._clock())
            return sum(n for _, n in self._recent) / TOKENS_WINDOW_S

    def render(self) -> str:
        s = self._stats()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {_fmt(value)}" for labels, value in samples)

        metric("npcd_queue_depth", "gauge", "Requests waiting for a batch slot.", [("", s.queue_depth)])
        metric("npcd_running_requests", "gauge", "Requests in the running batch.", [("", s.running)])
        metric("npcd_batch_size", "gauge", "Sequences decoded in the last engine step.", [("", s.last_batch_size)])
        metric("npcd_max_batch_size", "gauge", "Batch slots.", [("", s.max_batch_size)])
        metric("npcd_adapters_resident", "gauge", "LoRA adapters held in the weight stacks.",
               [("", s.adapters_resident)])
        metric("npcd_adapters_known", "gauge", "LoRA adapters loaded by name.", [("", s.adapters_known)])
        metric("npcd_tokens_generated_total", "counter", "Completion tokens generated.", [("", s.tokens_generated)])
        metric("npcd_prompt_tokens_total", "counter", "Prompt tokens prefilled (cache hits excluded).",
               [("", s.prompt_tokens)])
        metric("npcd_prefix_cache_hits_total", "counter", "Persona prefixes served from the cache.",
               [("", s.prefix_cache_hits)])
        metric("npcd_prefix_cache_misses_total", "counter", "Persona prefixes prefilled.",
               [("", s.prefix_cache_misses)])
        metric("npcd_engine_steps_total", "counter", "Engine steps.", [("", s.steps)])
        metric("npcd_tokens_per_second", "gauge",
               f"Completion tokens per second over the last {TOKENS_WINDOW_S:g} s.", [("", self.tokens_per_second())])
        with self._lock:
            finished, rejected = dict(self._finished), dict(self._rejected)
        metric("npcd_requests_finished_total", "counter", "Requests finished, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(finished.items())])
        metric("npcd_requests_rejected_total", "counter", "Requests refused before running, by gRPC status.",
               [(f'{{status="{r}"}}', n) for r, n in sorted(rejected.items())])
        lines += self.ttft.render() + self.inter_token.render()
        return "\n".join(lines) + "\n"


class MetricsServer:
    """GET /metrics on its own thread; scrapes never touch the event loop."""

    def __init__(self, metrics: Metrics, address: str):
        host, _, port = address.rpartition(":")
        outer = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = outer.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # scrapes every few seconds would drown the request log

        self._httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="npcd-metrics", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
