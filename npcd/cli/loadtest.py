"""`npcd loadtest`: plays game traffic against a daemon, optionally against baseline sidecars too.

Without `--address` it starts the daemon itself (`npcd serve` on free
loopback ports, with the personas directory and engine file given), so one
command measures a build from scratch. `--compare-naive` and
`--compare-llamacpp` then replay the same seeded schedule against those
baselines. Servers take turns: each starts when the one before it has been
stopped, so no two ever compete for the CPU (a daemon given with `--address`
keeps running, idle).

`--find-capacity` replaces the single run by a search per server: short
trials at growing, then bisected NPC counts (`npcd.tools.loadtest.capacity`),
a table of every trial, each server's capacity and npcd's ratio to each
baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator

from npcd.service import config as daemon_config
from npcd.tools.loadtest.capacity import SearchPlan
from npcd.tools.loadtest.scenario import APIS, Arrival, PersonaRef, Scenario
from npcd.tools.loadtest.targets import BASELINES, Baseline

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from npcd.engine.config import EngineConfig
    from npcd.tools.loadtest.capacity import Trial
    from npcd.tools.loadtest.report import RunResult
    from npcd.tools.loadtest.traffic import Progress, RequestRecord

LIVE_REFRESH_S = 0.5
FULL_LOAD = "1"  # --BASELINE-loads when not given: the whole schedule, once

# flag -> Scenario field, for the flags that map one to one
_SCENARIO_FLAGS = {
    "npcs": int, "persona_count": int, "tick_hz": float, "speak_every_s": float, "burst_every_s": float,
    "burst_size": int, "history_turns": int, "max_tokens": int, "temperature": float, "api": str, "clients": int,
    "duration_s": float, "max_requests": int, "drain_s": float, "seed": int,
}
# scenario flags a capacity search sets itself, per trial, and the flags that bound it instead
_SET_PER_TRIAL = {"npcs": "--capacity-start and --capacity-max", "duration_s": "--capacity-trial-s",
                  "drain_s": "--capacity-drain-s"}
_PLAN_FLAGS = {"capacity_start": int, "capacity_max": int, "capacity_trials": int, "capacity_trial_s": float,
               "capacity_drain_s": float}

# A server to measure: its name, and how to have it serving: yields (address, metrics URL or "").
Target = tuple[str, Callable[[], ContextManager[tuple[str, str]]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, plan = Scenario(), SearchPlan()
    target = parser.add_argument_group("target")
    target.add_argument("--address", help="load-test a running daemon at HOST:PORT (default: start one on loopback)")
    target.add_argument("--metrics-url", help="with --address: its Prometheus URL, e.g. http://127.0.0.1:9464/metrics")
    target.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    target.add_argument("--personas", type=Path, help="personas directory for a started daemon or the baseline "
                        "sidecars (default: from npcd.yaml)")
    target.add_argument("--engine", type=Path, help="engine file for a started daemon; its base model, thread "
                        "count and max_seq_len also configure the baseline sidecars (default: from npcd.yaml)")
    game = parser.add_argument_group("scenario")
    game.add_argument("--npcs", type=int, help=f"NPCs in the scene (default {d.npcs})")
    game.add_argument("--persona-count", type=int, default=d.personas,
                      help=f"personas the NPCs are spread over, the first N ready ones by id (default {d.personas})")
    game.add_argument("--tick-hz", type=float, default=d.tick_hz, help=f"game ticks per second (default {d.tick_hz:g})")
    game.add_argument("--speak-every-s", type=float, default=d.speak_every_s,
                      help=f"mean seconds between two lines of one NPC, Poisson (default {d.speak_every_s:g})")
    game.add_argument("--burst-every-s", type=float, default=d.burst_every_s,
                      help=f"mean seconds between crowd reactions, Poisson; 0 = none (default {d.burst_every_s:g})")
    game.add_argument("--burst-size", type=int, default=d.burst_size,
                      help=f"NPCs reacting on the same tick (default {d.burst_size})")
    game.add_argument("--history-turns", type=int, default=d.history_turns,
                      help=f"earlier turns sent with each line (default {d.history_turns})")
    game.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"answer length cap (default {d.max_tokens})")
    game.add_argument("--temperature", type=float, default=d.temperature,
                      help=f"sampling temperature; 0 = greedy (default {d.temperature:g})")
    game.add_argument("--api", choices=APIS, default=d.api,
                      help="say: one Say stream per line; session: one Session stream per client (default say)")
    game.add_argument("--clients", type=int, default=d.clients, help=f"simulated game clients (default {d.clients})")
    game.add_argument("--seed", type=int, default=d.seed, help="seed of the arrival schedule and its content")
    bounds = parser.add_argument_group("bounds")
    bounds.add_argument("--duration-s", type=float,
                        help=f"seconds during which requests are sent (default {d.duration_s:g})")
    bounds.add_argument("--max-requests", type=int, default=d.max_requests,
                        help=f"at most this many requests (default {d.max_requests})")
    bounds.add_argument("--drain-s", type=float,
                        help=f"then unfinished requests get this long before they are cut off (default {d.drain_s:g})")
    out = parser.add_argument_group("baselines, comparison and report")
    for b in BASELINES:
        out.add_argument(f"--compare-{b.flag}", action="store_true",
                         help=f"also measure the {b.server} sidecar ({b.description}), after npcd")
        out.add_argument(f"--{b.flag}-loads",
                         help=f"with --compare-{b.flag}: comma-separated fractions of the schedule to replay against "
                              f"it, e.g. 1,0.1 (default {FULL_LOAD})")
    out.add_argument("--target-p99-ms", type=float, default=300.0, help="p99 time-to-first-token target (default 300)")
    out.add_argument("--out", type=Path, default=Path("loadtest"),
                     help="report path prefix: writes PREFIX.json and PREFIX.png (default ./loadtest)")
    out.add_argument("--quiet", action="store_true", help="no live progress display")
    cap = parser.add_argument_group("capacity search")
    cap.add_argument("--find-capacity", action="store_true",
                     help="find the most NPCs each server sustains (p99 TTFT within --target-p99-ms, no errors): "
                          "short trials at doubling, then bisected NPC counts, npcd first, then each baseline asked "
                          "for, one after another")
    cap.add_argument("--capacity-start", type=int, default=plan.capacity_start,
                     help=f"first NPC count tried (default {plan.capacity_start})")
    cap.add_argument("--capacity-max", type=int, default=plan.capacity_max,
                     help=f"never more NPCs than this (default {plan.capacity_max})")
    cap.add_argument("--capacity-trials", type=int, default=plan.capacity_trials,
                     help=f"at most this many trials per server (default {plan.capacity_trials})")
    cap.add_argument("--capacity-trial-s", type=float, default=plan.capacity_trial_s,
                     help=f"seconds of sending per trial (default {plan.capacity_trial_s:g})")
    cap.add_argument("--capacity-drain-s", type=float, default=plan.capacity_drain_s,
                     help=f"then unfinished lines get this long; a cut-off line fails the trial "
                          f"(default {plan.capacity_drain_s:g})")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    d = Scenario()
    values = {}
    for flag, kind in _SCENARIO_FLAGS.items():
        name = "personas" if flag == "persona_count" else flag
        value = getattr(args, flag)
        values[name] = getattr(d, name) if value is None else kind(value)
    scenario = Scenario(**values)
    scenario.validate()
    return scenario


def plan_from_args(args: argparse.Namespace, scenario: Scenario) -> SearchPlan | None:
    """The capacity search asked for, or None; a flag the search sets per trial is refused, naming its stand-in."""
    if not args.find_capacity:
        return None
    for flag, instead in _SET_PER_TRIAL.items():
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --find-capacity, which sets it per "
                             f"trial (see {instead})")
    for b in BASELINES:
        if getattr(args, f"{b.flag}_loads") is not None:
            raise ValueError(f"--{b.flag}-loads does not apply to --find-capacity, which varies the NPC count instead")
    plan = SearchPlan(**{flag: kind(getattr(args, flag)) for flag, kind in _PLAN_FLAGS.items()})
    plan.validate(scenario)
    return plan


def load_fractions(text: str, flag: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not loads or any(not 0 < x <= 1 for x in loads):
        raise ValueError(f"{flag} fractions must be in (0, 1], got {text!r}")
    return sorted(set(loads), reverse=True)


def run(args: argparse.Namespace) -> int:
    from npcd.tools.loadtest import targets

    scenario = scenario_from_args(args)
    plan = plan_from_args(args, scenario)
    baselines = [b for b in BASELINES if getattr(args, f"compare_{b.flag}")]
    loads = {b.server: load_fractions(getattr(args, f"{b.flag}_loads") or FULL_LOAD, f"--{b.flag}-loads")
             for b in baselines}
    if args.address:
        targets.check_target(args.address, args.allow_remote)
    if args.metrics_url:
        host_port = args.metrics_url.split("//", 1)[-1].split("/", 1)[0]
        targets.check_target(host_port, args.allow_remote)
    config = daemon_config.load()
    personas_dir = Path(args.personas or config.personas)
    engine_file = Path(args.engine or config.engine)
    if (not args.address or baselines) and not personas_dir.is_dir():
        raise FileNotFoundError(f"personas directory {personas_dir} does not exist")
    try:
        return _run(args, scenario, plan, baselines, loads, personas_dir, engine_file)
    except (RuntimeError, TimeoutError) as exc:  # npcd did not start or answer, or a warm-up failed
        print(f"npcd loadtest: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, scenario: Scenario, plan: SearchPlan | None, baselines: list[Baseline],
         loads: dict[str, list[float]], personas_dir: Path, engine_file: Path) -> int:
    from rich.console import Console

    from npcd.engine.config import EngineConfig
    from npcd.tools.loadtest import capacity, report
    from npcd.tools.loadtest.scenario import build_schedule, thin

    console = Console(stderr=True)
    load_before = os.getloadavg()
    available = []
    for b in baselines:
        problem = b.missing()
        if problem:
            console.print(f"skipping the {b.server} sidecar: {problem}", markup=False)
        else:
            available.append(b)
    engine = EngineConfig.from_yaml(engine_file) if available else None
    servers: list[Target] = [("npcd", lambda: _daemon(args, personas_dir, engine_file, console))]
    servers += [(b.server, lambda b=b: _sidecar(b, personas_dir, engine, console)) for b in available]
    personas: list[PersonaRef] = []
    schedule: list[Arrival] = []
    runs: list[RunResult] = []
    searches: dict[str, list[Trial]] = {}
    for server, serving in servers:  # one after another: each is stopped before the next starts
        try:
            with serving() as (address, metrics_url):
                if not personas:  # npcd's personas cast every server's schedule
                    personas = _ready_personas(address)
                    cast = ", ".join(p.id for p in personas[: scenario.personas])
                    if plan is None:
                        schedule = build_schedule(scenario, personas)
                        console.print(f"{len(schedule)} requests over {scenario.duration_s:g} s from {scenario.npcs} "
                                      f"NPCs ({cast}); offered {len(schedule) / scenario.duration_s:.2f} lines/s")
                    else:
                        console.print(f"capacity search over NPC counts; personas {cast}")
                if plan is not None:
                    searches[server], at_capacity = _find_capacity(server, address, metrics_url, scenario, plan,
                                                                   personas, args, console)
                    runs.append(at_capacity)
                    continue
                for load in loads.get(server, [1.0]):
                    label = server if load == 1.0 else f"{server} x{load:g}"
                    runs.append(_replay(label, server, address, load, scenario, thin(schedule, load, scenario.seed),
                                        metrics_url, args.quiet, console))
        except (RuntimeError, TimeoutError) as exc:
            if server == "npcd":
                raise
            console.print(f"skipping the {server} sidecar, it failed: {exc}", markup=False)  # npcd's results stand
    section = None
    if plan is not None:
        scenario = plan.trial_scenario(scenario, plan.capacity_start)
        section = capacity.report_section(plan, args.target_p99_ms, searches)
    result = report.build(scenario, runs, args.target_p99_ms, personas[: scenario.personas],
                          _environment(engine_file if not args.address or available else None, load_before), section)
    json_path, png_path = (args.out.parent / f"{args.out.name}.{ext}" for ext in ("json", "png"))
    report.write_json(result, json_path)
    report.write_png(result, png_path)
    for line in report.summary_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {json_path} and {png_path}")
    return 0


def _ready_personas(address: str) -> list[PersonaRef]:
    import grpc

    from npcd.tools.loadtest.traffic import list_personas

    try:
        return asyncio.run(list_personas(address))
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(f"cannot list personas at {address}: {exc.code().name}: {exc.details()}") from None


@contextlib.contextmanager
def _daemon(args: argparse.Namespace, personas_dir: Path, engine_file: Path,
            console: Console) -> Iterator[tuple[str, str]]:
    """The daemon given by --address, or one started for the run and stopped after it."""
    if args.address:
        yield args.address, args.metrics_url or ""
        return
    from npcd.tools.loadtest import targets

    console.print(f"starting npcd (personas {personas_dir}, engine {engine_file}) ...")
    server, metrics_url = targets.daemon(personas_dir, engine_file)
    with server:
        yield server.address, metrics_url


@contextlib.contextmanager
def _sidecar(baseline: Baseline, personas_dir: Path, engine: EngineConfig,
             console: Console) -> Iterator[tuple[str, str]]:
    console.print(f"starting the {baseline.server} sidecar ({baseline.description}) ...", markup=False)
    with baseline.process(personas_dir, engine) as server:
        yield server.address, ""


def _find_capacity(server: str, address: str, metrics_url: str, scenario: Scenario, plan: SearchPlan,
                   personas: list[PersonaRef], args: argparse.Namespace,
                   console: Console) -> tuple[list[Trial], RunResult]:
    """One server's search; returns its trials and the run of its trial at capacity (the smallest if none passed)."""
    from npcd.tools.loadtest import capacity, report
    from npcd.tools.loadtest.scenario import build_schedule

    _warm_up(server, address, scenario, personas)
    runs: dict[int, RunResult] = {}

    def trial(npcs: int) -> Trial:
        if runs:
            time.sleep(capacity.SETTLE_S)
        trial_scenario = plan.trial_scenario(scenario, npcs)
        run = _replay(f"{server} {npcs} NPCs", server, address, 1.0, trial_scenario,
                      build_schedule(trial_scenario, personas), metrics_url, args.quiet, console)
        runs[npcs] = run
        result = capacity.Trial.from_summary(npcs, run.summary(trial_scenario.duration_s), args.target_p99_ms)
        console.print(report.capacity_row(server, result.to_dict()), highlight=False, markup=False, soft_wrap=True)
        return result

    console.print(f"[bold]{server}[/bold]: capacity search, at most {plan.capacity_trials} trials")
    console.print(report.capacity_header(), highlight=False, markup=False, soft_wrap=True)
    trials = capacity.search(plan, trial)
    return trials, runs[capacity.capacity_of(trials, plan).npcs or min(runs)]


def _warm_up(server: str, address: str, scenario: Scenario, personas: list[PersonaRef]) -> None:
    """One untimed line per persona, so that no trial pays for the server's first requests."""
    from npcd.tools.loadtest.scenario import WARM_UP_S, warm_up_schedule
    from npcd.tools.loadtest.traffic import Progress, TrafficRun

    schedule = warm_up_schedule(scenario, personas)
    window = dataclasses.replace(scenario, duration_s=1.0, drain_s=WARM_UP_S)
    records = asyncio.run(TrafficRun(address, window, schedule, Progress(f"{server} warm-up", len(schedule))).run())
    failed = collections.Counter(f"{r.status}: {r.error}" for r in records if not r.ok)
    if failed:
        raise RuntimeError(f"the {server} warm-up failed ({dict(failed)})")


def _environment(engine_file: Path | None, load_before: tuple[float, float, float]) -> dict:
    """The numbers depend on the machine as much as on npcd: record cores, load and engine settings."""
    from npcd.engine.config import EngineConfig

    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": round(load_before[0], 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "engine_file": engine_file.name if engine_file else None,  # the settings follow in full
        "engine": dataclasses.asdict(EngineConfig.from_yaml(engine_file)) if engine_file else None,
    }


def _replay(label: str, server: str, address: str, load: float, scenario: Scenario, schedule: list[Arrival],
            metrics_url: str, quiet: bool, console: Console) -> RunResult:
    from npcd.tools.loadtest.report import RunResult
    from npcd.tools.loadtest.scrape import MetricsScraper
    from npcd.tools.loadtest.traffic import Progress, TrafficRun

    progress = Progress(label, len(schedule))
    traffic = TrafficRun(address, scenario, schedule, progress)
    scraper = MetricsScraper(metrics_url, progress.now) if metrics_url else None

    async def go() -> list[RequestRecord]:
        task = asyncio.create_task(traffic.run())
        if scraper is not None:
            scraper.start()
        try:
            if quiet or not console.is_terminal:
                return await task
            return await _with_live(task, progress, console)
        finally:
            if scraper is not None:
                scraper.stop()

    console.print(f"[bold]{label}[/bold]: replaying {len(schedule)} requests against {address}")
    cpu_before = time.process_time()
    records = asyncio.run(go())
    return RunResult(label, server, address, load, records, scraper.samples if scraper else [],
                     client_cpu_s=round(time.process_time() - cpu_before, 2), wall_s=round(progress.now(), 2))


async def _with_live(task: asyncio.Task, progress: Progress, console: Console) -> list[RequestRecord]:
    from rich.live import Live

    with Live(_render(progress), console=console, auto_refresh=False, transient=False) as live:
        while not task.done():
            await asyncio.wait({task}, timeout=LIVE_REFRESH_S)
            live.update(_render(progress), refresh=True)
    return task.result()


def _render(progress: Progress) -> RenderableType:
    from rich.table import Table

    def ms(q: float) -> str:
        value = progress.recent_ttft_ms(q)
        return "-" if value is None else f"{value:.0f} ms"

    table = Table(title=f"{progress.label}  t={progress.now():.1f} s", show_header=True, header_style="bold")
    for column in ("sent", "in flight", "done", "errors", "tokens/s", "TTFT p50", "TTFT p99"):
        table.add_column(column, justify="right")
    table.add_row(f"{progress.sent}/{progress.total}", str(progress.in_flight), str(progress.done),
                  str(progress.errors), f"{progress.deltas_per_s():.0f}", ms(0.5), ms(0.99))
    return table
