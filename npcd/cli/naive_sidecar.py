"""The naive sidecar for `npcd loadtest --compare-naive`: transformers + PEFT, one request at a time, over gRPC.

Its command line (`--listen`, `--personas`, `--base`, `--threads`,
`--max-seq-len`) is every baseline sidecar's: `serve_sidecar` is shared with
`npcd.cli.llamacpp_sidecar`, which only builds another generator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from npcd.engine.config import EngineConfig

if TYPE_CHECKING:
    from npcd.personas.loader import Persona
    from npcd.tools.loadtest.sidecar import OneAtATimeGenerator

# Builds a sidecar's generator from its parsed flags, the resolved base directory and the loaded personas.
MakeGenerator = Callable[[argparse.Namespace, Path, "dict[str, Persona]"], "OneAtATimeGenerator"]


def serve_sidecar(module: str, name: str, description: str, make: MakeGenerator, argv: list[str] | None) -> int:
    """Parses the shared flags, loads the personas and serves `make`'s generator until SIGTERM or SIGINT."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = EngineConfig()
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--personas", type=Path, default=Path("personas"), help="personas directory")
    parser.add_argument("--base", default=d.base, help=f"base model, as in an engine file (default {d.base})")
    parser.add_argument("--threads", type=int, default=d.threads, help="compute threads; 0 = all cores")
    parser.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                        help=f"prompt + output tokens per line, as in an engine file (default {d.max_seq_len})")
    args = parser.parse_args(argv)

    from npcd.engine.weights import resolve_base
    from npcd.personas.loader import load_dir
    from npcd.tools.loadtest.sidecar import serve

    personas, errors = load_dir(args.personas)
    for error in errors:
        print(f"{name}: skipping {error}", file=sys.stderr)
    try:
        base_dir = resolve_base(args.base)
        asyncio.run(serve(args.listen, lambda: make(args, base_dir, personas),
                          lambda address: print(f"{name} listening on {address}", flush=True)))
    except (ImportError, ValueError, FileNotFoundError) as exc:  # set-up problems: say what, no traceback
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _naive(args: argparse.Namespace, base_dir: Path, personas: dict[str, Persona]) -> OneAtATimeGenerator:
    from npcd.tools.loadtest.naive import NaiveGenerator

    return NaiveGenerator(base_dir, personas, args.threads, args.max_seq_len)


def main(argv: list[str] | None = None) -> int:
    return serve_sidecar("npcd.cli.naive_sidecar", "naive sidecar", __doc__.split("\n")[0], _naive, argv)


if __name__ == "__main__":
    sys.exit(main())
