"""The capacity search as pure logic over recorded trials, its report text, and the flags that bound it.

No server here: a trial's outcome is decided by a rule (an NPC count passes
when it is at most a known capacity), so the search can be checked against
the answer it must find.
"""

from __future__ import annotations

import pytest

from npcd import cli
from npcd.tools.loadtest import capacity, report
from npcd.tools.loadtest.capacity import SearchPlan, Trial
from npcd.tools.loadtest.scenario import Scenario
from npcd.tools.loadtest.traffic import RequestRecord

TARGET_MS = 300.0


def trial(npcs: int, passed: bool) -> Trial:
    p99 = 100.0 if passed else 900.0
    return Trial(npcs=npcs, offered_lines_per_s=npcs / 5, sent=10, done=10 if passed else 8, errors=0 if passed else 2,
                 errors_by_status={} if passed else {"DEADLINE_EXCEEDED": 2}, ttft_p50_ms=p99 / 2, ttft_p99_ms=p99,
                 tokens_per_s=3.0 * npcs, lines_per_s=npcs / 5, passed=passed)


def run_search(true_capacity: int, plan: SearchPlan) -> list[Trial]:
    return capacity.search(plan, lambda n: trial(n, n <= true_capacity))


@pytest.mark.parametrize("true_capacity", [0, 1, 2, 3, 5, 7, 12, 31, 64, 100, 255])
def test_search_finds_the_capacity_within_its_resolution(true_capacity):
    plan = SearchPlan(capacity_trials=12)
    trials = run_search(true_capacity, plan)
    counts = [t.npcs for t in trials]
    assert len(counts) == len(set(counts)) <= plan.capacity_trials  # bounded, never the same count twice
    assert all(1 <= n <= plan.capacity_max for n in counts)
    found = capacity.capacity_of(trials, plan)
    assert found.resolved and not found.reached_max
    assert found.npcs <= true_capacity < found.failed_at
    assert found.failed_at - found.npcs <= plan.tolerance(found.npcs)
    if true_capacity < 10:  # below 1 / resolution the answer is exact
        assert found.npcs == true_capacity


def test_search_grows_geometrically_then_bisects():
    assert [t.npcs for t in run_search(12, SearchPlan())] == [4, 8, 16, 12, 14, 13]
    assert [t.npcs for t in run_search(0, SearchPlan(capacity_start=8))] == [8, 4, 2, 1]


def test_search_stops_at_the_bound_and_at_the_trial_budget():
    plan = SearchPlan(capacity_start=4, capacity_max=20)
    trials = run_search(1000, plan)
    assert [t.npcs for t in trials] == [4, 8, 16, 20]
    found = capacity.capacity_of(trials, plan)
    assert (found.npcs, found.failed_at, found.reached_max, found.resolved) == (20, None, True, True)

    budget = SearchPlan(capacity_trials=3)
    trials = run_search(37, budget)
    assert [t.npcs for t in trials] == [4, 8, 16]
    found = capacity.capacity_of(trials, budget)
    assert (found.npcs, found.failed_at, found.reached_max, found.resolved) == (16, None, False, False)


def test_a_pass_above_a_fail_is_not_trusted():
    plan = SearchPlan()
    noisy = [trial(4, True), trial(16, True), trial(8, False), trial(6, True)]
    assert capacity.bracket(noisy) == (6, 8)
    assert capacity.next_npcs(noisy, plan) == 7
    assert capacity.capacity_of(noisy + [trial(7, False)], plan).npcs == 6


def test_ratio_and_the_range_the_brackets_allow():
    plan = SearchPlan(capacity_max=64)
    npcd = capacity.capacity_of([trial(8, True), trial(10, False)], plan)         # 8 or 9
    llama = capacity.capacity_of([trial(2, True), trial(3, False)], plan)         # exactly 2
    assert capacity.ratio(npcd, llama) == {"ratio": 4.0, "low": 4.0, "high": 4.5}
    at_max = capacity.capacity_of([trial(64, True)], plan)                        # 64 or more
    assert capacity.ratio(at_max, llama) == {"ratio": 32.0, "low": 32.0, "high": None}
    open_bracket = capacity.capacity_of([trial(8, True), trial(16, False)], plan)  # 8 to 15
    assert capacity.ratio(at_max, open_bracket) == {"ratio": 8.0, "low": 4.27, "high": None}
    assert capacity.ratio(llama, at_max) == {"ratio": 0.03, "low": None, "high": 0.03}
    none = capacity.capacity_of([trial(1, False)], plan)
    assert none.npcs == 0 and none.resolved
    assert capacity.ratio(npcd, none)["ratio"] is None


def test_trial_from_a_run_summary():
    ok = [RequestRecord(f"r{i}", i, "elf", False, False, scheduled_s=0.1 * i, sent_s=0.1 * i,
                        first_token_s=0.1 * i + 0.05 * (i + 1), finished_s=0.1 * i + 1.0, completion_tokens=4,
                        status="OK") for i in range(10)]
    summary = report.summarize(ok, [], duration_s=2.0)
    t = Trial.from_summary(6, summary, 500.0)
    assert (t.npcs, t.sent, t.done, t.errors, t.passed) == (6, 10, 10, 0, True)
    assert t.ttft_p50_ms == pytest.approx(250.0) and t.ttft_p99_ms == pytest.approx(500.0)
    assert not Trial.from_summary(6, summary, 499.0).passed  # p99 over the target
    cut = RequestRecord("late", 0, "elf", False, False, scheduled_s=0.0, sent_s=0.0, status="DEADLINE_EXCEEDED")
    failed = Trial.from_summary(6, report.summarize(ok + [cut], [], duration_s=2.0), 10_000.0)
    assert (failed.errors, failed.errors_by_status, failed.passed) == (1, {"DEADLINE_EXCEEDED": 1}, False)


def test_capacity_lines_show_every_trial_and_the_ratio():
    plan = SearchPlan()
    searches = {"npcd": [trial(4, True), trial(8, True), trial(16, False), trial(12, False), trial(10, True),
                         trial(11, False)],
                "llama.cpp": [trial(4, False), trial(2, True), trial(3, False)]}
    section = capacity.report_section(plan, TARGET_MS, searches)
    assert [s["capacity"]["npcs"] for s in section["servers"]] == [10, 2]
    assert section["ratios"] == [{"baseline": "llama.cpp", "ratio": 5.0, "low": 5.0, "high": 5.0}]
    lines = report.capacity_lines({"capacity": section})
    rows = [line for line in lines if line.endswith(("pass", "FAIL"))]
    assert len(rows) == 9
    assert rows[0].split()[:2] == ["npcd", "4"] and rows[-1].split()[:2] == ["llama.cpp", "3"]
    assert "capacity of npcd: 10 NPCs (11 failed)" in lines
    assert "npcd / llama.cpp: 5.0x" in lines
    budget_spent = {"npcd": searches["npcd"][:2], "llama.cpp": searches["llama.cpp"]}  # npcd: 8 or more
    lines = report.capacity_lines({"capacity": capacity.report_section(plan, TARGET_MS, budget_spent)})
    assert "capacity of npcd: >= 8 NPCs (no count failed; the trial budget ran out)" in lines
    assert "npcd / llama.cpp: 4.0x as found (at least 4.0x, no upper limit, from the trials' brackets)" in lines


@pytest.mark.parametrize("flags,named", [
    (["--npcs", "8"], ["--npcs", "--capacity-start"]),
    (["--duration-s", "5"], ["--duration-s", "--capacity-trial-s"]),
    (["--capacity-trials", "0"], ["--capacity-trials", "1..30"]),
    (["--capacity-start", "300"], ["--capacity-start", "1..256"]),
    (["--capacity-max", "5000"], ["--capacity-max", "--max-requests 2000"]),
    (["--capacity-trial-s", "3"], ["--capacity-trial-s 3", "at least 5"]),
    (["--compare-naive", "--naive-loads", "0.5"], ["--naive-loads"]),
])
def test_bad_capacity_flags_are_named_with_their_limit(flags, named, capsys):
    assert cli.main(["loadtest", "--find-capacity", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    for word in named:
        assert word in err


def test_plan_bounds_the_largest_trial_by_max_requests():
    plan = SearchPlan(capacity_max=256)
    plan.validate(Scenario())  # the defaults fit
    with pytest.raises(ValueError, match="--max-requests 1000"):
        plan.validate(Scenario(max_requests=1000))
    assert plan.trial_scenario(Scenario(), 12) == Scenario(npcs=12, duration_s=30.0, drain_s=10.0)
