"""`npcd eval`: does each persona's adapter make the character? (the work is in npcd.tools.evaluate)"""

from __future__ import annotations

import argparse
from pathlib import Path

from npcd.engine.config import WEIGHT_MODES
from npcd.personas.loader import load_dir
from npcd.tools.evaluate import engine_config, evaluate, markdown, table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--personas", type=Path, default=Path("personas"), help="personas directory (default personas)")
    parser.add_argument("--engine", type=Path, help="engine definition (default: the embedded base, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the generated lines")
    parser.add_argument("--report", type=Path,
                        help="markdown report to write (default docs/personas_eval.md, with --actions "
                             "docs/personas_actions.md); '-' for none")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--actions", action="store_true",
                        help="evaluate the personas' actions instead: how often a structured line picks an action "
                             "that fits each labelled situation (report: docs/personas_actions.md)")
    parser.add_argument("--weights", choices=WEIGHT_MODES,
                        help="override the engine's weights mode, e.g. to compare a quantized mode's NLL with fp32's")


def run(args: argparse.Namespace) -> int:
    import time

    from npcd.engine.engine import Engine

    personas, errors = load_dir(args.personas)
    for err in errors:
        print(f"skipped: {err}")
    if args.actions:
        return run_actions(args, personas)
    started = time.monotonic()
    adapted = [p for p in personas.values() if p.adapter_path is not None]
    config = engine_config(args.engine, batch=sum(len(p.held_out_examples) for p in adapted),
                           adapters=len(adapted), threads=args.threads)
    engine = Engine(config.replace(weights=args.weights) if args.weights else config)
    reports = evaluate(personas, engine, seed=args.seed)
    seconds = time.monotonic() - started
    print(table(reports))
    write_report(args, args.report or Path("docs/personas_eval.md"), markdown, reports, seconds)
    ok = all(r.reduction >= 0.2 for r in reports) and all(r.attribution >= 0.8 for r in reports)
    print("targets met" if ok else "targets NOT met (NLL reduction >= 20% and attribution >= 80% per persona)")
    return 0 if ok else 1


def _command(args: argparse.Namespace) -> str:
    return ("npcd eval" + (" --actions" if args.actions else "") + (f" --seed {args.seed}" if args.seed else "")
            + (f" --weights {args.weights}" if args.weights else ""))


def write_report(args: argparse.Namespace, path: Path, render, reports, seconds: float) -> None:
    if str(path) == "-":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(reports, _command(args), seconds))
    print(f"report: {path}")


def run_actions(args: argparse.Namespace, personas: dict) -> int:
    """The action evaluation alone: a table and a report; exits 1 when a reply did not parse."""
    import time

    from npcd.engine.engine import Engine
    from npcd.tools.evaluate_actions import actions_markdown, actions_table, evaluate_actions

    started = time.monotonic()
    acting = [p for p in personas.values() if p.actions]
    config = engine_config(args.engine, batch=sum(len(p.situations) for p in acting), adapters=len(acting),
                           threads=args.threads)
    engine = Engine(config.replace(weights=args.weights) if args.weights else config)
    reports = evaluate_actions(personas, engine, seed=args.seed)
    print(actions_table(reports))
    write_report(args, args.report or Path("docs/personas_actions.md"), actions_markdown, reports,
                 time.monotonic() - started)
    return 0 if all(r.valid == 1.0 for r in reports) else 1
