"""Wire requests checked against the daemon's limits; every error names the field and the limit."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import grpc

from npcd.engine.api import SAMPLING_BOUNDS, STOP_CHARS, STOP_STRINGS, SamplingParams
from npcd.personas.loader import Persona
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import Limits
from npcd.service.conversations import Turn

DEFAULT_SPEAKER = "Player"  # who says a line when the request names nobody


class RequestError(Exception):
    """A request refused before it reached the engine; becomes a status (Say) or an Error event (Session)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    def event(self, request_id: str) -> pb.Event:
        return pb.Event(request_id=request_id, error=pb.Error(code=self.code.value[0], status=self.code.name,
                                                              message=self.message,
                                                              retry_after_ms=self.retry_after_ms))

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Say's trailing metadata: the retry hint, when there is one."""
        return (("retry-after-ms", str(self.retry_after_ms)),) if self.retry_after_ms else ()


def invalid(field: str, problem: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


# Names and keys are rendered into the prompt's transcript ("Speaker: line", "[key: value]"): a newline (or any
# control character) in one could start a forged line of its own, so they must be one plain line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _check_text(field: str, value: str, limit: int, *, required: bool = False, name: bool = False) -> None:
    if required and not value.strip():
        raise invalid(field, "required")
    if len(value) > limit:
        raise invalid(field, f"at most {limit} characters, got {len(value)}")
    bad = _CONTROL.search(value) if name else None
    if bad:
        raise invalid(field, f"must be one line without control characters, got {bad.group()!r} at "
                             f"character {bad.start()}")


def internal(exc: Exception, when: str = "before it started") -> RequestError:
    return RequestError(grpc.StatusCode.INTERNAL, f"the request failed {when}: {exc!r}")


def validate(req: pb.SayRequest, limits: Limits) -> None:
    """Every field against the daemon's limits; the error names the field and the limit."""
    _check_text("request_id", req.request_id, limits.max_id_chars, name=True)
    _check_text("persona", req.persona, limits.max_id_chars, required=True, name=True)
    _check_text("npc_id", req.npc_id, limits.max_id_chars, name=True)
    _check_text("speaker", req.speaker, limits.max_id_chars, name=True)
    _check_text("line", req.line, limits.max_line_chars, required=True)
    _check_text("conversation", req.conversation, limits.max_id_chars, name=True)
    if len(req.history) > limits.max_history_turns:
        raise invalid("history", f"at most {limits.max_history_turns} turns, got {len(req.history)}")
    for i, turn in enumerate(req.history):
        _check_text(f"history[{i}].speaker", turn.speaker, limits.max_id_chars, required=True, name=True)
        _check_text(f"history[{i}].text", turn.text, limits.max_line_chars)
    if len(req.context) > limits.max_context_entries:
        raise invalid("context", f"at most {limits.max_context_entries} entries, got {len(req.context)}")
    for key, value in req.context.items():
        _check_text(f"context key {key[:40]!r}", key, limits.max_id_chars, required=True, name=True)
        _check_text(f"context[{key!r}]", value, limits.max_line_chars)
    s = req.sampling
    # the operator's caps only ever narrow the shared bounds
    bounds = SAMPLING_BOUNDS | {"max_tokens": SAMPLING_BOUNDS["max_tokens"].capped(limits.max_tokens)}
    for name, bound in bounds.items():
        problem = bound.check(getattr(s, name)) if s.HasField(name) else None
        if problem:
            raise invalid(f"sampling.{name}", problem)
    stops = STOP_STRINGS.capped(limits.max_stop_strings)
    if len(s.stop) not in stops:
        raise invalid("sampling.stop", f"{stops.describe()}, got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        problem = STOP_CHARS.check(len(stop))
        if problem:
            raise invalid(f"sampling.stop[{i}]", problem)
    if req.priority not in pb.Priority.values():
        raise invalid("priority", f"unknown value {req.priority}; use PRIORITY_AMBIENT or PRIORITY_PLAYER")
    if req.segmentation not in pb.Segmentation.values():
        raise invalid("segmentation", f"unknown value {req.segmentation}; use SEGMENTATION_NONE, "
                                      f"SEGMENTATION_SENTENCE or SEGMENTATION_CLAUSE")
    if req.deadline_ms > limits.max_deadline_ms:
        raise invalid("deadline_ms", f"at most {limits.max_deadline_ms}, got {req.deadline_ms}")


def check_ref(ref: pb.ConversationRef, limits: Limits, prefix: str = "") -> None:
    _check_text(f"{prefix}conversation", ref.conversation, limits.max_id_chars, required=True, name=True)
    _check_text(f"{prefix}persona", ref.persona, limits.max_id_chars, required=True, name=True)


def check_turns(turns: Sequence[pb.ConversationTurn], field: str, limits: Limits) -> list[Turn]:
    """Turns a game writes into a conversation, held to the limits a request's history is."""
    if len(turns) > limits.max_conversation_turns:
        raise invalid(field, f"at most {limits.max_conversation_turns} turns, got {len(turns)}")
    for i, turn in enumerate(turns):
        _check_text(f"{field}[{i}].speaker", turn.speaker, limits.max_id_chars, required=True, name=True)
        _check_text(f"{field}[{i}].text", turn.text, limits.max_line_chars)
    return [Turn(t.speaker, t.text, npc=t.npc) for t in turns]


def sampling_for(persona: Persona, overrides: pb.SamplingOverrides, limits: Limits) -> SamplingParams:
    """`Persona.sampling_params` with a validated request's overrides; the operator's max_tokens cap
    applies to the persona's default too (a persona may allow longer replies than this daemon does)."""
    params = persona.sampling_params(
        seed=overrides.seed if overrides.HasField("seed") else None,
        overrides={name: getattr(overrides, name) for name in SAMPLING_BOUNDS if overrides.HasField(name)},
        extra_stop=overrides.stop,
    )
    return replace(params, max_tokens=min(params.max_tokens, limits.max_tokens))


