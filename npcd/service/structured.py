"""A request's structured-output fields as the engine's StructuredOutput and the prompt's action menu.

`structured`, `actions` and `response_format` (npcd.proto) are checked here, each
refusal naming the field (and, inside a schema, the JSON path); the persona's
own actions and emotions were checked when its file loaded. Every schema is
compiled by the backend before the request is admitted, so a grammar that
cannot be built is an INVALID_ARGUMENT for this request, never a failed step.
"""

from __future__ import annotations

import json
from typing import Callable

from npcd.engine.api import InvalidRequest, StructuredOutput
from npcd.personas.actions import (
    ACTION_NAME,
    MAX_ACTIONS,
    SAY_FIELD,
    Action,
    action_args_problem,
    canonical,
    menu,
    pick,
    schema_problem,
    text_field,
)
from npcd.personas.loader import Persona
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import Limits
from npcd.service.validation import invalid

Compile = Callable[[str], None]  # Backend.check_schema


def structured_output(req: pb.SayRequest, persona: Persona, limits: Limits,
                      compile_schema: Compile) -> tuple[StructuredOutput | None, str]:
    """(what the engine constrains the reply to, the menu appended to the user turn); (None, "") for free text."""
    if req.response_format:
        return _response_format(req.response_format, limits, compile_schema), ""
    if not (req.structured or req.actions):
        return None, ""
    actions = _requested_actions(req, persona, limits) if req.actions else persona.actions
    schema = persona.reply_schema(actions)
    _compile(compile_schema, "actions" if req.actions else "structured", schema)
    return StructuredOutput(schema, SAY_FIELD), menu(actions, persona.emotions)


def _json(field: str, text: str, limits: Limits) -> object:
    if len(text) > limits.max_schema_chars:
        raise invalid(field, f"at most {limits.max_schema_chars} characters, got {len(text)}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(field, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _response_format(text: str, limits: Limits, compile_schema: Compile) -> StructuredOutput:
    schema = _json("response_format", text, limits)
    problem = schema_problem(schema)
    if problem:
        raise invalid("response_format", f"not a valid JSON Schema: {problem}")
    assert isinstance(schema, dict)
    out = StructuredOutput(canonical(schema), text_field(schema))
    _compile(compile_schema, "response_format", out.schema)
    return out


def _requested_actions(req: pb.SayRequest, persona: Persona, limits: Limits) -> tuple[Action, ...]:
    if len(req.actions) > MAX_ACTIONS:
        raise invalid("actions", f"at most {MAX_ACTIONS} actions, got {len(req.actions)}")
    declared = {a.name for a in persona.actions}
    requested: list[Action] = []
    for i, spec in enumerate(req.actions):
        field = f"actions[{i}]"
        if not ACTION_NAME.fullmatch(spec.name):
            raise invalid(f"{field}.name", f"must match {ACTION_NAME.pattern}, got {spec.name[:80]!r}")
        if any(a.name == spec.name for a in requested):
            raise invalid(f"{field}.name", f"{spec.name!r} is listed twice")
        if len(spec.description) > limits.max_line_chars:
            raise invalid(f"{field}.description", f"at most {limits.max_line_chars} characters, "
                                                  f"got {len(spec.description)}")
        args = None
        if spec.args_schema_json:
            args = _json(f"{field}.args_schema_json", spec.args_schema_json, limits)
            problem = action_args_problem(args)
            if problem:
                raise invalid(f"{field}.args_schema_json", problem)
        elif not spec.description and spec.name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise invalid(f"{field}.name", f"{spec.name!r} is not an action of persona {persona.id!r} (its actions: "
                                           f"{known}); give a description or args_schema_json to declare a new one")
        requested.append(Action(spec.name, spec.description, args))  # type: ignore[arg-type]
    return pick(persona.actions, requested)


def _compile(compile_schema: Compile, field: str, schema: str) -> None:
    try:
        compile_schema(schema)
    except InvalidRequest as exc:
        raise invalid(field, str(exc)) from None
