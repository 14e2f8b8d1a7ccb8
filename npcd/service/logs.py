"""Logging: readable console lines for a developer, JSON lines for a log pipeline.

Every request gets exactly one line when it ends (persona, reason, tokens and
timings), so a slow or failed NPC line can be found without a debugger, and a
busy daemon does not drown its own log in per-token noise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from npcd.engine.api import Finished


def configure(*, json: bool = False, level: str = "info") -> None:
    """Set up structlog once, writing to stderr (stdout stays free for `npcd say`)."""
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "npcd") -> Any:
    return structlog.get_logger(name)


def request_done(log: Any, *, request_id: str, persona: str, npc_id: str, finished: Finished) -> None:
    """The one line per request."""
    log.info(
        "request",
        id=request_id,
        persona=persona,
        npc=npc_id or None,
        reason=finished.reason.value,
        prompt_tokens=finished.prompt_tokens,
        cached_tokens=finished.cached_prompt_tokens,
        completion_tokens=finished.completion_tokens,
        queued_ms=round(finished.queued_ms, 1),
        first_token_ms=round(finished.first_token_ms, 1),
        total_ms=round(finished.total_ms, 1),
        error=finished.error,
    )
