"""`npcd` command line: a small registry of subcommand modules.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; adding one is one entry in COMMANDS, with its help line.
Only the module of the command being run is imported, so a command's
imports cannot break the others, and modules keep heavy imports (torch, the
engine) inside `run`: `npcd --help` and `npcd personas check` start
instantly and need no model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # exposes add_arguments(parser) and run(args) -> int
    help: str


COMMANDS: dict[str, Command] = {
    "serve": Command("npcd.cli.serve",
        "run the daemon (gRPC API, persona hot-reload, metrics)"),
    "say": Command("npcd.cli.say",
        "ask a persona for one line and stream the answer (needs `npcd serve`, or --local)"),
    "personas": Command("npcd.cli.personas",
        "list a running daemon's personas, or check a personas directory"),
    "train": Command("npcd.cli.train",
        "fine-tune a persona's LoRA adapter on its example exchanges (CPU, a few minutes)"),
    "eval": Command("npcd.cli.eval",
        "measure each persona's adapter on held-out examples (NLL and attribution) and write a report"),
    "demo": Command("npcd.cli.demo",
        "demos of mixed-adapter batches; `npcd demo story \"an idea\"`"),
    "loadtest": Command("npcd.cli.loadtest",
        "play game dialogue traffic against a daemon and report latency, throughput and batch sizes"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, so one command's imports cannot break another."""
    parser = argparse.ArgumentParser(prog="npcd", description="Voices for game NPCs: one base LLM, a LoRA per persona.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        command_parser = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            module = importlib.import_module(spec.module)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad configuration: say what, no traceback
        print(f"npcd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional extra is missing; its message says what to install
        print(f"npcd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `npcd personas | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1  # the output was not all delivered

