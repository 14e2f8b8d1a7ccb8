"""npcd: one base LLM, a LoRA adapter per persona, mixed-adapter batches streamed to game NPCs.

The package is layered, and each layer imports only the ones below it:

    cli/       argparse and printing for every `npcd` subcommand (imported lazily, one per command)
    tools/     train, eval, demo, loadtest as libraries
    service/   the gRPC daemon (torch-free): config, persona registry, validation, servicer, metrics
    personas/  persona files, the template language and prompt building (torch-free)
    engine/    the inference engine, the only layer that imports torch (engine.api and
               engine.config do not, so the service can name its types without loading torch)

The names below are the public Python API; they load lazily so that
`import npcd` costs nothing and never imports torch by itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Engine": "npcd.engine.engine",
    "AsyncEngine": "npcd.engine.async_engine",
    "EngineConfig": "npcd.engine.config",
    "GenerationRequest": "npcd.engine.api",
    "SamplingParams": "npcd.engine.api",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'npcd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
