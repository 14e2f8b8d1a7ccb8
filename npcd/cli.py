"""`npcd` command line: a small registry of subcommand modules.

Each subcommand lives in its own module exposing `HELP`, `add_arguments(parser)`
and `run(args) -> int`; adding one is one line in COMMANDS. Modules keep heavy
imports (torch, the engine) inside `run`, so `npcd --help` and
`npcd personas check` start instantly and need no model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "serve": "npcd.commands.serve",
    "say": "npcd.commands.say",
    "personas": "npcd.commands.personas",
    "train": "npcd.train",
    "eval": "npcd.evaluate",
    "demo": "npcd.demo",
    "loadtest": "npcd.loadtest.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npcd", description="Voices for game NPCs: one base LLM, a LoRA per persona.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad configuration: say what, no traceback
        print(f"npcd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
