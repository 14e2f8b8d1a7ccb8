"""/metrics on prometheus-client: the names dashboards and the load-test scraper read, scraped over real HTTP."""

from __future__ import annotations

import dataclasses
import re
import urllib.error
import urllib.request

import pytest
from server_helpers import engine_config, running_daemon, say, wait_for, write_persona

from npcd.engine.api import EngineStats
from npcd.service.metrics import (
    ENGINE_COUNTERS,
    ENGINE_GAUGES,
    Metrics,
    MetricsServer,
    engine_labels,
)
from npcd.tools.loadtest import scrape

# Every npcd series the hand-written exposition had, by the exact sample name, plus the step failures counter.
NPCD_SAMPLES = {
    "npcd_queue_depth", "npcd_running_requests", "npcd_batch_size", "npcd_max_batch_size",
    "npcd_adapters_resident", "npcd_adapters_known", "npcd_tokens_per_second",
    "npcd_tokens_generated_total", "npcd_prompt_tokens_total", "npcd_prefix_cache_hits_total",
    "npcd_prefix_cache_misses_total", "npcd_engine_steps_total", "npcd_engine_step_failures_total",
    "npcd_requests_finished_total", "npcd_requests_rejected_total", "npcd_lines_unread_cancelled_total",
    *(f"npcd_{h}_seconds_{part}" for h in ("time_to_first_token", "inter_token") for part in ("bucket", "sum", "count")),
    "npcd_engine_info",
}
DESCRIBED = {"backend": "torch", "model": "/models/tiny", "device": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX2",
             "dtype": "float32", "weights": "int4",
             "kernels": {"projections": "int8 matmul", "lm_head": "bfloat16 linear"},
             "prefill_policy": "mixed", "threads": 2, "max_batch_size": 32, "max_seq_len": 1024}
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def distinct_stats(offset: int = 0) -> EngineStats:
    """Every field a different number, so a metric wired to the wrong field shows."""
    names = [f.name for f in dataclasses.fields(EngineStats) if f.type in ("int", int)]
    return EngineStats(**{name: offset + 10 * (i + 1) for i, name in enumerate(names)})


def fetch(address: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as reply:
        return reply.read().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            out.append((match["name"], dict(LABEL.findall(match["labels"] or "")), float(match["value"])))
    return out


class Clock:
    """A clock the test moves, for the tokens/s window."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    """Metrics over a stats source the test changes, served on a free loopback port."""
    state = {"stats": distinct_stats()}
    clock = Clock()
    metrics = Metrics(lambda: state["stats"], DESCRIBED, clock=clock)
    server = MetricsServer(metrics, "127.0.0.1:0")
    server.start()
    try:
        yield metrics, server, state, clock
    finally:
        server.stop()


def test_names_are_the_ones_dashboards_read(served):
    metrics, server, _, _ = served
    metrics.request_finished("length", 8, 30.0)
    metrics.request_rejected("RESOURCE_EXHAUSTED")
    metrics.inter_token.observe(0.012)
    text = fetch(server.address)
    names = {name for name, _, _ in samples(text)}
    assert {n for n in names if n.startswith("npcd_")} == NPCD_SAMPLES
    assert not any(n.endswith("_created") for n in names)  # disabled: they were never exported
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types["npcd_tokens_generated_total"] == "counter" and types["npcd_queue_depth"] == "gauge"
    assert types["npcd_time_to_first_token_seconds"] == "histogram"
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names


def test_engine_numbers_are_read_at_scrape_time(served):
    _, server, state, _ = served
    for stats in (distinct_stats(), distinct_stats(offset=5)):
        state["stats"] = stats
        values = scrape.parse(fetch(server.address))  # the load-test scraper's own parser
        for name, field, _ in ENGINE_GAUGES:
            assert values[name] == getattr(stats, field), name
        for name, field, _ in ENGINE_COUNTERS:
            assert values[f"{name}_total"] == getattr(stats, field), name
        assert set(scrape.GAUGES) <= set(values)


def test_observations_land_in_their_series(served):
    metrics, server, _, clock = served
    for reason, tokens, ttft_ms in [("length", 8, 30.0), ("length", 8, 300.0), ("stop", 3, 20.0), ("cancelled", 0, 0)]:
        metrics.request_finished(reason, tokens, ttft_ms)
    metrics.request_rejected("NOT_FOUND")
    for gap in (0.004, 0.03, 0.03, 2.0):
        metrics.inter_token.observe(gap)
    got = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples(fetch(server.address))}
    assert got[("npcd_requests_finished_total", (("reason", "length"),))] == 2
    assert got[("npcd_requests_finished_total", (("reason", "cancelled"),))] == 1
    assert got[("npcd_requests_rejected_total", (("status", "NOT_FOUND"),))] == 1
    # A request with no tokens has no first token: three TTFTs, one of them above 250 ms.
    assert got[("npcd_time_to_first_token_seconds_count", ())] == 3
    assert got[("npcd_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 2
    assert got[("npcd_time_to_first_token_seconds_sum", ())] == pytest.approx(0.35)
    assert got[("npcd_inter_token_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("npcd_inter_token_seconds_bucket", (("le", "0.05"),))] == 3
    assert got[("npcd_inter_token_seconds_bucket", (("le", "1.0"),))] == 3
    assert got[("npcd_inter_token_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("npcd_tokens_per_second", ())] == pytest.approx(19 / 10)
    clock.now += 11  # past the window: nothing finished lately
    assert scrape.parse(fetch(server.address))["npcd_tokens_per_second"] == 0


def test_engine_info_states_the_resolved_fast_path(served):
    _, server, _, _ = served
    (labels,) = [labels for name, labels, _ in samples(fetch(server.address)) if name == "npcd_engine_info"]
    assert labels == {"backend": "torch", "model": "/models/tiny", "device": "cpu", "cpu": "AMD EPYC",
                      "cpu_capability": "AVX2", "dtype": "float32", "weights": "int4",
                      "kernel_projections": "int8 matmul", "kernel_lm_head": "bfloat16 linear",
                      "prefill_policy": "mixed", "threads": "2", "max_batch_size": "32", "max_seq_len": "1024"}


def test_each_daemon_has_its_own_registry_and_port(served):
    metrics, server, _, _ = served
    other = MetricsServer(Metrics(distinct_stats, DESCRIBED), "127.0.0.1:0")
    other.start()
    try:
        assert other.address != server.address and other.address.startswith("127.0.0.1:")
        metrics.request_rejected("NOT_FOUND")
        assert 'npcd_requests_rejected_total{status="NOT_FOUND"}' in fetch(server.address)
        assert "npcd_requests_rejected_total{" not in fetch(other.address)
    finally:
        other.stop()
    with pytest.raises(urllib.error.URLError):
        fetch(other.address)  # stopped: the port is closed


def test_daemon_metrics_agree_with_its_engine(tmp_path, tiny_model_dir):
    personas = tmp_path / "personas"
    personas.mkdir()
    write_persona(personas, "plain")
    with running_daemon(personas, engine_config(tiny_model_dir)) as (daemon, stub):
        say(stub, request_id="m", persona="plain", line="Hi")
        wait_for(lambda: daemon.backend.stats().running == 0, 5, "the request to leave the batch")
        parsed = samples(fetch(daemon.metrics_address))
        stats = daemon.backend.stats()
        values = {name: value for name, labels, value in parsed if not labels}
        for name, field, _ in ENGINE_COUNTERS:
            assert values[f"{name}_total"] == getattr(stats, field), name
        assert values["npcd_tokens_generated_total"] >= 1 and values["process_resident_memory_bytes"] > 0
        (info,) = [labels for name, labels, _ in parsed if name == "npcd_engine_info"]
        assert info == engine_labels(daemon.backend.describe())
        assert info["device"] == "cpu" and info["dtype"] == "float32" and info["kernel_attention"]
