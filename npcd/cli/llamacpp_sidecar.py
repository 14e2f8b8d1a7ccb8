"""The llama.cpp sidecar for `npcd loadtest --compare-llamacpp`: one request at a time, LoRA set per request.

Same flags as `npcd.cli.naive_sidecar`. Needs llama-cpp-python and llama.cpp's
LoRA converter (`make bench-peers`); persona adapters are converted to GGUF
on first use and cached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from npcd.cli.naive_sidecar import serve_sidecar

if TYPE_CHECKING:
    from npcd.personas.loader import Persona
    from npcd.tools.loadtest.sidecar import OneAtATimeGenerator


def _llamacpp(args: argparse.Namespace, base_dir: Path, personas: dict[str, Persona]) -> OneAtATimeGenerator:
    from npcd.tools.loadtest.llamacpp import LlamaCppGenerator

    return LlamaCppGenerator(args.base, base_dir, personas, args.threads, args.max_seq_len)


def main(argv: list[str] | None = None) -> int:
    return serve_sidecar("npcd.cli.llamacpp_sidecar", "llama.cpp sidecar", __doc__.split("\n")[0], _llamacpp, argv)


if __name__ == "__main__":
    sys.exit(main())
