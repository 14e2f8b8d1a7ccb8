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
    parser.add_argument("--report", type=Path, default=Path("docs/personas_eval.md"),
                        help="markdown report to write (default docs/personas_eval.md); '-' for none")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--weights", choices=WEIGHT_MODES,
                        help="override the engine's weights mode, e.g. to compare a quantized mode's NLL with fp32's")


def run(args: argparse.Namespace) -> int:
    import time

    from npcd.engine.engine import Engine

    personas, errors = load_dir(args.personas)
    for err in errors:
        print(f"skipped: {err}")
    started = time.monotonic()
    adapted = [p for p in personas.values() if p.adapter_path is not None]
    config = engine_config(args.engine, batch=sum(len(p.held_out_examples) for p in adapted),
                           adapters=len(adapted), threads=args.threads)
    engine = Engine(config.replace(weights=args.weights) if args.weights else config)
    reports = evaluate(personas, engine, seed=args.seed)
    seconds = time.monotonic() - started
    print(table(reports))
    if str(args.report) != "-":
        command = "npcd eval" + (f" --seed {args.seed}" if args.seed else "") + \
            (f" --weights {args.weights}" if args.weights else "")
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown(reports, command, seconds))
        print(f"report: {args.report}")
    ok = all(r.reduction >= 0.2 for r in reports) and all(r.attribution >= 0.8 for r in reports)
    print("targets met" if ok else "targets NOT met (NLL reduction >= 20% and attribution >= 80% per persona)")
    return 0 if ok else 1
