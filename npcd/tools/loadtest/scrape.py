"""Samples the daemon's Prometheus endpoint during a run: what the engine did, from its side.

The client sees latencies; only the daemon knows how many sequences each
engine step decoded. `npcd_batch_size` is a gauge (the last step's size), so
it is sampled often; the counters `npcd_engine_steps_total` and
`npcd_tokens_generated_total` give the exact mean tokens per step between
two samples, which no sampling rate can miss.
"""

from __future__ import annotations

import threading
import urllib.request
from typing import Callable

SCRAPE_INTERVAL_S = 0.25
GAUGES = {
    "npcd_batch_size": "batch_size",
    "npcd_running_requests": "running",
    "npcd_queue_depth": "queue_depth",
    "npcd_engine_steps_total": "steps",
    "npcd_tokens_generated_total": "tokens",
}


def parse(text: str) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text format, by metric name."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return out


class MetricsScraper:
    """Polls `url` on its own thread; `samples` holds {t, batch_size, running, queue_depth, steps, tokens}."""

    def __init__(self, url: str, clock: Callable[[], float], interval_s: float = SCRAPE_INTERVAL_S):
        self.url = url
        self.interval_s = interval_s
        self.clock = clock  # the run's clock, so samples line up with request times
        self.samples: list[dict[str, float]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadtest-scrape", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2.0) as reply:
                    values = parse(reply.read().decode())
                sample = {"t": round(self.clock(), 3)}
                sample.update({short: values[name] for name, short in GAUGES.items() if name in values})
                self.samples.append(sample)
            except OSError:
                self.failures += 1
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
