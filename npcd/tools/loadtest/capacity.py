"""How many NPCs a server sustains: a bounded search over NPC counts, one short trial per count.

A trial is the load test's scene with N NPCs for a short sending window; it
passes when every request finished OK and p99 time to first token is within
the target (`report.sustains`). The search grows N geometrically from
`capacity_start` while trials pass (or shrinks it while they fail), then
bisects between the largest pass and the smallest fail until the two are
within `resolution` of each other, or the trial budget is spent.

The capacity is the largest passing count below the smallest failing one. A
pass above a fail is load noise, not capacity, so it is not trusted: the
answer errs low, which is the safe side for a game's budget.

The search itself is pure over recorded trials (`next_npcs`, `capacity_of`),
so it is tested without any server; `search` drives it with a function that
runs one trial.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from npcd.tools.loadtest.report import sustains
from npcd.tools.loadtest.scenario import Scenario

GROWTH = 2              # the bracketing phase doubles (or halves) the NPC count
MAX_TRIALS = 30         # a hard bound on --capacity-trials: each trial is a full short run
MAX_NPCS = 10_000
REQUEST_MARGIN = 1.2    # Poisson arrivals exceed their mean: the largest trial must fit --max-requests with room
MIN_TRIAL_REQUESTS = 5  # a trial of one NPC must expect this many lines, or its pass or fail says nothing
SETTLE_S = 1.0          # pause between trials: cut-off lines of the last one are cancelled server side


@dataclass(frozen=True)
class SearchPlan:
    """The search's bounds; each field is the `npcd loadtest` flag of the same name."""

    capacity_start: int = 4          # the first NPC count tried
    capacity_max: int = 256          # never more NPCs than this
    capacity_trials: int = 8         # at most this many trials per server
    capacity_trial_s: float = 30.0   # each trial sends requests during this long
    capacity_drain_s: float = 10.0   # then unfinished lines get this long (cut off = error = fail)
    resolution: float = 0.1          # stop once smallest fail - largest pass <= this share of the pass (>= 1 NPC)

    def validate(self, scenario: Scenario) -> None:
        """Errors name the flag and its limit; `scenario` supplies the rhythm and --max-requests."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"loadtest: {msg}")

        need(1 <= self.capacity_max <= MAX_NPCS, f"--capacity-max must be in 1..{MAX_NPCS}, got {self.capacity_max}")
        need(1 <= self.capacity_start <= self.capacity_max,
             f"--capacity-start must be in 1..{self.capacity_max} (--capacity-max), got {self.capacity_start}")
        need(1 <= self.capacity_trials <= MAX_TRIALS,
             f"--capacity-trials must be in 1..{MAX_TRIALS}, got {self.capacity_trials}")
        need(0 < self.capacity_trial_s <= 600, f"--capacity-trial-s must be in (0, 600], got {self.capacity_trial_s:g}")
        need(0 <= self.capacity_drain_s <= 600, f"--capacity-drain-s must be in 0..600, got {self.capacity_drain_s:g}")
        need(0 < self.resolution < 1, f"resolution must be in (0, 1), got {self.resolution:g}")
        smallest = self.trial_scenario(scenario, 1)  # where a failing search ends
        few = smallest.offered_lines_per_s * smallest.duration_s
        need(few >= MIN_TRIAL_REQUESTS,
             f"--capacity-trial-s {self.capacity_trial_s:g} gives one NPC about {few:.1f} lines per trial "
             f"(--speak-every-s {scenario.speak_every_s:g}, --burst-every-s {scenario.burst_every_s:g}); a trial "
             f"needs at least {MIN_TRIAL_REQUESTS} to pass or fail on: lengthen the trials")
        largest = self.trial_scenario(scenario, self.capacity_max)
        expected = largest.offered_lines_per_s * largest.duration_s
        need(expected * REQUEST_MARGIN <= scenario.max_requests,
             f"--capacity-max {self.capacity_max} offers about {expected:.0f} requests in a "
             f"{self.capacity_trial_s:g} s trial, more than --max-requests {scenario.max_requests} allows with "
             f"{REQUEST_MARGIN:g}x room for Poisson noise: raise --max-requests or lower --capacity-max")

    def trial_scenario(self, scenario: Scenario, npcs: int) -> Scenario:
        """The scene of one trial: `scenario`'s rhythm and content with `npcs` NPCs and the trial's window."""
        return dataclasses.replace(scenario, npcs=npcs, duration_s=self.capacity_trial_s,
                                   drain_s=self.capacity_drain_s)

    def tolerance(self, npcs: int) -> int:
        return max(1, math.floor(npcs * self.resolution))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Trial:
    """One trial's outcome: what the table shows and the search decides on."""

    npcs: int
    offered_lines_per_s: float
    sent: int
    done: int
    errors: int
    errors_by_status: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tokens_per_s: float
    lines_per_s: float
    passed: bool

    @classmethod
    def from_summary(cls, npcs: int, summary: dict[str, Any], target_p99_ms: float) -> "Trial":
        """From `report.summarize` of the trial's run."""
        return cls(npcs=npcs, offered_lines_per_s=summary["offered_lines_per_s"], sent=summary["sent"],
                   done=summary["done"], errors=summary["errors"], errors_by_status=summary["errors_by_status"],
                   ttft_p50_ms=summary["ttft_ms"]["p50"], ttft_p99_ms=summary["ttft_ms"]["p99"],
                   tokens_per_s=summary["tokens_per_s"], lines_per_s=summary["lines_per_s"],
                   passed=sustains(summary, target_p99_ms))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Capacity:
    """What the trials say about one server."""

    npcs: int                # largest passing count below the smallest failing one; 0 if none passed
    failed_at: int | None    # smallest failing count; None if every trial passed
    reached_max: bool        # --capacity-max itself passed: the capacity is at least `npcs`
    resolved: bool           # the bracket closed (or hit a bound) before the trial budget ran out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bracket(trials: list[Trial]) -> tuple[int, int | None]:
    """(largest passing count below the smallest failing one, or 0; the smallest failing count, or None)."""
    hi = min((t.npcs for t in trials if not t.passed), default=None)
    lo = max((t.npcs for t in trials if t.passed and (hi is None or t.npcs < hi)), default=0)
    return lo, hi


def next_npcs(trials: list[Trial], plan: SearchPlan) -> int | None:
    """The next NPC count to try, or None when the search is over. Never repeats a count."""
    if len(trials) >= plan.capacity_trials:
        return None
    if not trials:
        return plan.capacity_start
    lo, hi = bracket(trials)
    if hi is None:   # everything passed: grow, up to the bound
        return None if lo >= plan.capacity_max else min(lo * GROWTH, plan.capacity_max)
    if lo == 0:      # nothing passed: shrink, down to one NPC
        return None if hi == 1 else max(1, hi // GROWTH)
    if hi - lo <= plan.tolerance(lo):
        return None
    return (lo + hi) // 2


def capacity_of(trials: list[Trial], plan: SearchPlan) -> Capacity:
    lo, hi = bracket(trials)
    reached_max = hi is None and lo >= plan.capacity_max
    if hi is None:
        resolved = reached_max
    elif lo == 0:
        resolved = hi == 1
    else:
        resolved = hi - lo <= plan.tolerance(lo)
    return Capacity(npcs=lo, failed_at=hi, reached_max=reached_max, resolved=resolved)


def search(plan: SearchPlan, run_trial: Callable[[int], Trial]) -> list[Trial]:
    """Runs trials until `next_npcs` says stop (at most `plan.capacity_trials`); returns them in order."""
    trials: list[Trial] = []
    while (npcs := next_npcs(trials, plan)) is not None:
        trials.append(run_trial(npcs))
    return trials


def ratio(server: Capacity, baseline: Capacity) -> dict[str, Any]:
    """`server`'s capacity over `baseline`'s, as found, and the range the trials allow.

    Each capacity lies between its largest pass and one below its smallest
    fail; with no fail seen (it passed --capacity-max, or the trial budget ran
    out while growing) it has no upper limit. `low` and `high` are the ratio's
    limits that follow, None where there is none.
    """
    if baseline.npcs == 0:
        return {"ratio": None, "low": None, "high": None}
    server_high = server.failed_at - 1 if server.failed_at is not None else None
    baseline_high = baseline.failed_at - 1 if baseline.failed_at is not None else None
    return {"ratio": round(server.npcs / baseline.npcs, 2),
            "low": round(server.npcs / baseline_high, 2) if baseline_high else None,
            "high": round(server_high / baseline.npcs, 2) if server_high is not None else None}


def report_section(plan: SearchPlan, target_p99_ms: float, searches: dict[str, list[Trial]]) -> dict[str, Any]:
    """The report's `capacity`: the plan, every server's trials and capacity, and npcd's ratio to each baseline.

    `searches` maps a server name to its trials, npcd's first.
    """
    found = {server: capacity_of(trials, plan) for server, trials in searches.items()}
    section: dict[str, Any] = {
        "target_p99_ttft_ms": target_p99_ms, "plan": plan.to_dict(),
        "servers": [{"server": server, "capacity": found[server].to_dict(), "trials": [t.to_dict() for t in trials]}
                    for server, trials in searches.items()],
    }
    if "npcd" in found:
        section["ratios"] = [{"baseline": server, **ratio(found["npcd"], cap)} for server, cap in found.items()
                             if server != "npcd"]
    return section
