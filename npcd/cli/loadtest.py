"""`npcd loadtest`: plays game traffic against a daemon, optionally against the naive sidecar too.

Without `--address` it starts the daemon itself (`npcd serve` on free
loopback ports, with the personas directory and engine file given), so one
command measures a build from scratch. `--compare-naive` then replays the
same seeded schedule against the naive sidecar, after the daemon has been
stopped, so the two never compete for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from npcd.service import config as daemon_config
from npcd.tools.loadtest.scenario import APIS, Arrival, Scenario

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from npcd.tools.loadtest.report import RunResult
    from npcd.tools.loadtest.traffic import Progress, RequestRecord

LIVE_REFRESH_S = 0.5

# flag -> Scenario field, for the flags that map one to one
_SCENARIO_FLAGS = {
    "npcs": int, "persona_count": int, "tick_hz": float, "speak_every_s": float, "burst_every_s": float,
    "burst_size": int, "history_turns": int, "max_tokens": int, "temperature": float, "api": str, "clients": int,
    "duration_s": float, "max_requests": int, "drain_s": float, "seed": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Scenario()
    target = parser.add_argument_group("target")
    target.add_argument("--address", help="load-test a running daemon at HOST:PORT (default: start one on loopback)")
    target.add_argument("--metrics-url", help="with --address: its Prometheus URL, e.g. http://127.0.0.1:9464/metrics")
    target.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    target.add_argument("--personas", type=Path, help="personas directory for a started daemon or the naive sidecar "
                        "(default: from npcd.yaml)")
    target.add_argument("--engine", type=Path, help="engine file for a started daemon; its base model, and thread "
                        "count also configure the naive sidecar (default: from npcd.yaml)")
    game = parser.add_argument_group("scenario")
    game.add_argument("--npcs", type=int, default=d.npcs, help=f"NPCs in the scene (default {d.npcs})")
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
    bounds.add_argument("--duration-s", type=float, default=d.duration_s,
                        help=f"seconds during which requests are sent (default {d.duration_s:g})")
    bounds.add_argument("--max-requests", type=int, default=d.max_requests,
                        help=f"at most this many requests (default {d.max_requests})")
    bounds.add_argument("--drain-s", type=float, default=d.drain_s,
                        help=f"then unfinished requests get this long before they are cut off (default {d.drain_s:g})")
    out = parser.add_argument_group("comparison and report")
    out.add_argument("--compare-naive", action="store_true",
                     help="also replay the schedule against the naive sidecar (transformers + PEFT, one at a time)")
    out.add_argument("--naive-loads", default="1",
                     help="with --compare-naive: comma-separated fractions of the schedule to replay against the "
                          "naive sidecar, e.g. 1,0.1 (default 1)")
    out.add_argument("--target-p99-ms", type=float, default=300.0, help="p99 time-to-first-token target (default 300)")
    out.add_argument("--out", type=Path, default=Path("loadtest"),
                     help="report path prefix: writes PREFIX.json and PREFIX.png (default ./loadtest)")
    out.add_argument("--quiet", action="store_true", help="no live progress display")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    values = {("personas" if k == "persona_count" else k): kind(getattr(args, k)) for k, kind in _SCENARIO_FLAGS.items()}
    scenario = Scenario(**values)
    scenario.validate()
    return scenario


def naive_loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--naive-loads must be comma-separated numbers, got {text!r}") from None
    if not loads or any(not 0 < x <= 1 for x in loads):
        raise ValueError(f"--naive-loads fractions must be in (0, 1], got {text!r}")
    return sorted(set(loads), reverse=True)


def run(args: argparse.Namespace) -> int:
    from npcd.tools.loadtest import targets

    scenario = scenario_from_args(args)
    loads = naive_loads(args.naive_loads)
    if args.address:
        targets.check_target(args.address, args.allow_remote)
    if args.metrics_url:
        host_port = args.metrics_url.split("//", 1)[-1].split("/", 1)[0]
        targets.check_target(host_port, args.allow_remote)
    config = daemon_config.load()
    personas_dir = args.personas or config.personas
    engine_file = args.engine or config.engine
    if not args.address or args.compare_naive:
        if not Path(personas_dir).is_dir():
            raise FileNotFoundError(f"personas directory {personas_dir} does not exist")
    return _run(args, scenario, loads, Path(personas_dir), Path(engine_file))


def _run(args: argparse.Namespace, scenario: Scenario, loads: list[float], personas_dir: Path,
         engine_file: Path) -> int:
    import grpc
    from rich.console import Console

    from npcd.engine.config import EngineConfig
    from npcd.tools.loadtest import report, targets
    from npcd.tools.loadtest.scenario import build_schedule, thin
    from npcd.tools.loadtest.traffic import list_personas

    console = Console(stderr=True)
    load_before = os.getloadavg()
    runs: list[report.RunResult] = []
    naive = None
    if args.compare_naive:  # started now so its start overlaps the daemon's; it idles until its turn
        engine = EngineConfig.from_yaml(engine_file)
        naive = targets.naive_sidecar(personas_dir, engine.base, engine.threads)
        naive.start()
    with contextlib.ExitStack() as stack:
        if naive is not None:
            stack.callback(naive.stop)
        with contextlib.ExitStack() as daemon_stack:  # the daemon stops before the sidecar runs
            if args.address:
                address, metrics_url = args.address, args.metrics_url or ""
            else:
                console.print(f"starting npcd (personas {personas_dir}, engine {engine_file}) ...")
                server, metrics_url = targets.daemon(personas_dir, engine_file)
                address = daemon_stack.enter_context(server).address
            try:
                personas = asyncio.run(list_personas(address))
            except grpc.aio.AioRpcError as exc:
                console.print(f"npcd loadtest: cannot list personas at {address}: {exc.code().name}: {exc.details()}",
                              markup=False)
                return 1
            schedule = build_schedule(scenario, personas)
            cast = ", ".join(p.id for p in personas[: scenario.personas])
            console.print(f"{len(schedule)} requests over {scenario.duration_s:g} s from {scenario.npcs} NPCs "
                          f"({cast}); offered {len(schedule) / scenario.duration_s:.2f} lines/s")
            runs.append(_replay("npcd", "npcd", address, 1.0, scenario, schedule, metrics_url, args.quiet, console))
        if naive is not None:
            console.print("waiting for the naive sidecar (transformers + PEFT, one request at a time) ...")
            naive.__enter__()
            for load in loads:
                label = "naive" if load == 1.0 else f"naive x{load:g}"
                runs.append(_replay(label, "naive", naive.address, load, scenario,
                                    thin(schedule, load, scenario.seed), "", args.quiet, console))
    result = report.build(scenario, runs, args.target_p99_ms, personas[: scenario.personas],
                          _environment(engine_file if not args.address or args.compare_naive else None, load_before))
    json_path, png_path = (args.out.parent / f"{args.out.name}.{ext}" for ext in ("json", "png"))
    report.write_json(result, json_path)
    report.write_png(result, png_path)
    for line in report.summary_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {json_path} and {png_path}")
    return 0


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
