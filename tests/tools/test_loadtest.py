"""`npcd loadtest` end to end: real servers as subprocesses on loopback, short bounded runs, the reports checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_helpers import write_persona

from npcd import cli
from npcd.tools.loadtest import capacity, llamacpp_gguf, targets
from npcd.tools.loadtest.capacity import SearchPlan, Trial
from npcd.tools.loadtest.scenario import PersonaRef, Scenario, build_schedule, thin

pytestmark = pytest.mark.slow  # starts subprocesses

MAX_TOKENS = 4
# a few seconds of traffic: 6 NPCs speaking about once a second, plus crowd bursts
RUN_FLAGS = ["--npcs", "6", "--speak-every-s", "1", "--burst-every-s", "1.5", "--burst-size", "3",
             "--duration-s", "2.5", "--drain-s", "20", "--max-tokens", str(MAX_TOKENS), "--clients", "2", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_adapters) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loadtest")
    personas = root / "personas"
    personas.mkdir()
    write_persona(personas, "elf", adapter=tiny_adapters["elf"])
    write_persona(personas, "merchant", adapter=tiny_adapters["merchant"])
    write_persona(personas, "plain")
    engine = root / "engine.yaml"
    engine.write_text(f"base: {tiny_model_dir}\nweights: fp32\ndevice: cpu\nmax_batch_size: 8\nmax_seq_len: 512\n"
                      "threads: 1\n")
    return personas, engine


def check_run(run: dict) -> None:
    """The counts of one run agree with each other and with its requests."""
    s, requests = run["summary"], run["requests"]
    ids = [r["request_id"] for r in requests]
    assert len(ids) == len(set(ids)) > 0
    assert s["not_sent"] == 0 and s["sent"] == len(requests)
    ok = [r for r in requests if r["status"] == "OK"]
    assert s["done"] == len(ok) == s["sent"] - s["errors"]
    assert s["errors"] == sum(s["errors_by_status"].values())
    assert s["ttft_ms"]["n"] == len(ok)
    for r in ok:
        assert 0 < r["ttft_ms"] <= r["total_ms"]
        assert 1 <= r["completion_tokens"] <= MAX_TOKENS
        assert len(r["gaps_ms"]) < r["completion_tokens"]
        assert r["sent_s"] >= r["scheduled_s"] - 0.01  # asyncio may wake a hair early
    assert s["completion_tokens"] == sum(r["completion_tokens"] for r in ok)


def load_report(prefix: Path) -> dict:
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(prefix.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def daemon(setup):
    """One `npcd serve` subprocess for the module, started the way `npcd loadtest` starts its own."""
    server, metrics_url = targets.daemon(*setup)
    with server:
        yield server.address, metrics_url


def test_say_run_with_naive_comparison(setup, daemon, tmp_path):
    personas, engine = setup
    address, metrics_url = daemon
    out = tmp_path / "report"
    code = cli.main(["loadtest", "--address", address, "--metrics-url", metrics_url, "--personas", str(personas),
                     "--engine", str(engine), *RUN_FLAGS, "--compare-naive", "--out", str(out)])
    assert code == 0
    report = load_report(out)
    npcd_run, naive_run = report["runs"]
    assert (npcd_run["server"], naive_run["server"]) == ("npcd", "naive")
    for run in report["runs"]:
        check_run(run)
        assert run["summary"]["errors"] == 0, run["summary"]["errors_by_status"]
    # the same seed gave both servers the same requests at the same offsets
    assert [(r["request_id"], r["scheduled_s"]) for r in npcd_run["requests"]] == \
           [(r["request_id"], r["scheduled_s"]) for r in naive_run["requests"]]
    assert report["personas_used"] == ["elf", "merchant", "plain"]
    assert report["personas_with_adapter"] == ["elf", "merchant"]
    assert {r["persona"] for r in npcd_run["requests"]} == {"elf", "merchant", "plain"}
    assert npcd_run["summary"]["batches"]["samples"] > 0  # the daemon's /metrics was scraped
    assert naive_run["summary"]["batches"] is None        # the sidecar has no metrics endpoint
    assert list(report["comparisons"]) == ["naive"]
    comparison = report["comparisons"]["naive"]
    assert comparison["npcd_lines_per_s"] == npcd_run["summary"]["lines_per_s"] > 0
    same = comparison["same_schedule"]
    assert same["baseline_lines_per_s"] == naive_run["summary"]["lines_per_s"]
    # greedy: the batched multi-adapter engine and one-at-a-time PEFT write the same lines
    assert same["lines_finished_by_both"] == npcd_run["summary"]["done"]
    assert same["identical_text_share"] == 1.0


def test_session_run(daemon, tmp_path):
    address, metrics_url = daemon
    out = tmp_path / "session"
    code = cli.main(["loadtest", "--address", address, "--metrics-url", metrics_url, "--api", "session",
                     "--persona-count", "2", *RUN_FLAGS, "--out", str(out)])
    assert code == 0
    report = load_report(out)
    [run] = report["runs"]
    check_run(run)
    assert run["summary"]["errors"] == 0, run["summary"]["errors_by_status"]
    assert report["personas_used"] == ["elf", "merchant"]
    assert "comparisons" not in report and "capacity" not in report


# a tiny search: 2 NPCs, then 4 (the bound) or 1; trials of 2 s, each NPC speaking about twice a second
CAPACITY_FLAGS = ["--find-capacity", "--capacity-start", "2", "--capacity-max", "4", "--capacity-trials", "2",
                  "--capacity-trial-s", "2", "--capacity-drain-s", "20", "--speak-every-s", "0.5", "--burst-every-s",
                  "1.5", "--burst-size", "2", "--max-tokens", str(MAX_TOKENS), "--clients", "2",
                  "--target-p99-ms", "3000", "--quiet"]


def check_capacity(report: dict, servers: list[str]) -> None:
    """The search followed the pure logic to its end, and the report agrees with its trials."""
    section = report["capacity"]
    plan = SearchPlan(**section["plan"])
    assert [s["server"] for s in section["servers"]] == servers
    for s in section["servers"]:
        trials = [Trial(**t) for t in s["trials"]]
        assert [t.npcs for t in trials] == [capacity.next_npcs(trials[:i], plan) for i in range(len(trials))]
        assert capacity.next_npcs(trials, plan) is None
        assert s["capacity"] == capacity.capacity_of(trials, plan).to_dict()
        for t in trials:
            assert t.sent > 0 and t.done + t.errors == t.sent
            assert t.passed == (t.errors == 0 and t.ttft_p99_ms is not None and t.ttft_p99_ms <= 3000)
    assert [r["baseline"] for r in section["ratios"]] == servers[1:]
    assert [run["server"] for run in report["runs"]] == servers  # each server's trial at capacity
    for run, s in zip(report["runs"], section["servers"]):
        check_run(run)
        npcs = s["capacity"]["npcs"] or min(t["npcs"] for t in s["trials"])
        assert run["label"] == f"{s['server']} {npcs} NPCs"
        assert run["summary"]["sent"] == next(t["sent"] for t in s["trials"] if t["npcs"] == npcs)
    assert "comparisons" not in report


def check_capacity_output(err: str, servers: list[str]) -> None:
    assert "TTFT p99" in err and "result" in err  # the trial table's header
    for server in servers:
        assert f"capacity of {server}: " in err
    for baseline in servers[1:]:
        assert f"npcd / {baseline}: " in err


def test_find_capacity_against_the_naive_sidecar(setup, daemon, tmp_path, capsys):
    personas, engine = setup
    address, metrics_url = daemon
    out = tmp_path / "capacity"
    code = cli.main(["loadtest", "--address", address, "--metrics-url", metrics_url, "--personas", str(personas),
                     "--engine", str(engine), *CAPACITY_FLAGS, "--compare-naive", "--out", str(out)])
    assert code == 0
    check_capacity(load_report(out), ["npcd", "naive"])
    check_capacity_output(capsys.readouterr().err, ["npcd", "naive"])


@pytest.mark.skipif(llamacpp_gguf.missing() is not None, reason=f"llama.cpp sidecar: {llamacpp_gguf.missing()}")
def test_find_capacity_against_the_llamacpp_sidecar(setup, daemon, tmp_path, capsys):
    personas, engine = setup
    address, metrics_url = daemon
    out = tmp_path / "capacity"
    code = cli.main(["loadtest", "--address", address, "--metrics-url", metrics_url, "--personas", str(personas),
                     "--engine", str(engine), *CAPACITY_FLAGS, "--compare-llamacpp", "--out", str(out)])
    assert code == 0
    check_capacity(load_report(out), ["npcd", "llama.cpp"])
    check_capacity_output(capsys.readouterr().err, ["npcd", "llama.cpp"])


def test_a_missing_llamacpp_is_skipped_saying_what_installs_it(setup, daemon, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPCD_CACHE", str(tmp_path / "empty-cache"))  # no converter there
    personas, engine = setup
    address, metrics_url = daemon
    out = tmp_path / "skipped"
    code = cli.main(["loadtest", "--address", address, "--personas", str(personas), "--engine", str(engine),
                     *RUN_FLAGS, "--compare-llamacpp", "--out", str(out)])
    assert code == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines at its width
    assert "skipping the llama.cpp sidecar" in err and "make bench-peers" in err
    assert [run["server"] for run in load_report(out)["runs"]] == ["npcd"]


@pytest.mark.parametrize("flags", [
    ["--address", "10.1.2.3:50051"],
    ["--address", "npcd.example.com:50051"],
    ["--address", "127.0.0.1:50051", "--metrics-url", "http://192.168.1.20:9464/metrics"],
])
def test_refuses_a_non_loopback_target(flags, capsys):
    assert cli.main(["loadtest", *flags, "--quiet"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:1", True), ("127.8.9.10:1", True), ("localhost:1", True), ("[::1]:1", True),
    ("0.0.0.0:1", False), ("10.0.0.1:1", False), ("example.org:1", False),
])
def test_is_loopback(address, loopback):
    assert targets.is_loopback(address) is loopback


def test_schedule_is_seeded_and_thinning_keeps_a_subset():
    cast = [PersonaRef("a", "A"), PersonaRef("b", "B")]
    scenario = Scenario(npcs=10, speak_every_s=2.0, burst_every_s=3.0, burst_size=4, duration_s=30.0, seed=7)
    schedule = build_schedule(scenario, cast)
    assert schedule == build_schedule(scenario, cast)
    assert schedule != build_schedule(Scenario(**{**scenario.to_dict(), "seed": 8}), cast)
    assert all(a.at_s <= b.at_s for a, b in zip(schedule, schedule[1:]))
    assert {a.persona for a in schedule} == {"a", "b"} and any(a.burst for a in schedule)
    assert 0.5 * scenario.offered_lines_per_s < len(schedule) / scenario.duration_s < 1.5 * scenario.offered_lines_per_s
    half = thin(schedule, 0.5, seed=7)
    assert set(half) < set(schedule) and half == thin(schedule, 0.5, seed=7)
    capped = build_schedule(Scenario(**{**scenario.to_dict(), "max_requests": 5}), cast)
    assert capped == schedule[:5]
