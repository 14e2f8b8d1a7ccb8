"""What an NPC may do besides talk: its actions and emotions, and the JSON reply that carries them.

A structured reply is one JSON object, in this key order:

    {"say": "Forty silver, friend.", "emotion": "amused",
     "action": {"name": "give_item", "args": {"item": "sword", "price": 40}}}

`say` comes first for two reasons. It is what the player waits for, so its words
stream before anything else is decided. And the persona adapters were trained on
plain replies that start right after the assistant marker: with `{"say": "` forced
first, the adapter writes its line in its own voice, and the emotion and action
are chosen knowing what was said.

This module is torch-free: the persona loader, the daemon's request validation
and the documentation use it; the engine only sees the finished JSON Schema.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

SAY_FIELD = "say"            # the top-level string streamed to the game as TextDeltas
EMOTION_FIELD = "emotion"
ACTION_FIELD = "action"
# The spoken line is capped in characters, so a reply always closes: the engine also closes the string once the
# request's max_tokens are spent (npcd.engine.grammar). 600 characters hold 512 tokens of ordinary prose.
SAY_MAX_CHARS = 600
# A string argument with no maxLength (or enum, const, pattern) of its own gets this one: an unbounded string is
# where a small model rambles, and the engine budgets a fixed number of tokens for everything after `say`.
ARG_STRING_MAX_CHARS = 64
ACTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_ACTIONS = 32   # each is a branch of the reply grammar and a clause of the prompt's action menu
MAX_EMOTIONS = 32
EMOTION_CHARS = 32


@dataclass(frozen=True)
class Action:
    """One thing an NPC can do. `args` is the JSON Schema of its arguments object; None: it takes none."""

    name: str
    description: str = ""
    args: dict[str, Any] | None = None

    def closed_args(self) -> dict[str, Any] | None:
        """`args` as the grammar uses it: every object takes only the keys it lists (all required unless it
        says `required`), and every free string is bounded, so an argument the game did not declare can never
        be produced and a reply always ends."""
        return _closed(copy.deepcopy(self.args)) if self.args is not None else None

    def signature(self) -> str:
        """The action as the prompt shows it: `give_item {"item": sword|rope, "price": 1-1000}`."""
        props = (self.args or {}).get("properties") or {}
        if not props:
            return self.name
        parts = [f'"{key}": {_hint(schema)}' for key, schema in props.items()]
        return f"{self.name} {{{', '.join(parts)}}}"


def action_args_problem(args: Any) -> str | None:
    """Why an action's `args` cannot be used (it must be a JSON Schema of an object), or None."""
    problem = schema_problem(args)
    if problem:
        return f"not a valid JSON Schema: {problem}"
    if args.get("type", "object") != "object":
        return f"must describe an object (type: object), got type {args.get('type')!r}"
    return None


def _closed(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = {k: _closed(v) for k, v in schema[key].items()}
    for key in ("items", "additionalItems", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _closed(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            schema[key] = [_closed(v) for v in schema[key]]
    if schema.get("type") == "object" or "properties" in schema:
        schema.setdefault("additionalProperties", False)
        schema.setdefault("required", list(schema.get("properties") or {}))
    bounded = any(k in schema for k in ("maxLength", "enum", "const", "pattern", "format"))
    if schema.get("type") == "string" and not bounded:
        schema["maxLength"] = ARG_STRING_MAX_CHARS
    return schema


def _hint(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "value"
    if "enum" in schema:
        return "|".join(str(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "value")
    if kind in ("integer", "number") and "minimum" in schema and "maximum" in schema:
        return f"{schema['minimum']}-{schema['maximum']}"
    return str(kind)


def reply_schema(actions: Sequence[Action], emotions: Sequence[str]) -> dict[str, Any]:
    """The JSON Schema of a structured reply: `say`, then `emotion` when labels exist, then `action`."""
    properties: dict[str, Any] = {SAY_FIELD: {"type": "string", "minLength": 1, "maxLength": SAY_MAX_CHARS}}
    if emotions:
        properties[EMOTION_FIELD] = {"enum": list(emotions)}
    if actions:
        choices = []
        for action in actions:
            shape: dict[str, Any] = {"name": {"const": action.name}}
            args = action.closed_args()
            if args is not None:
                shape["args"] = args
            choices.append({"type": "object", "properties": shape, "required": list(shape),
                            "additionalProperties": False})
        properties[ACTION_FIELD] = choices[0] if len(choices) == 1 else {"anyOf": choices}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def menu(actions: Sequence[Action], emotions: Sequence[str]) -> str:
    """The lines appended to the user turn, so the model knows what its choices mean."""
    lines = []
    if actions:
        lines.append("Actions you can take: " + "; ".join(
            f"{a.signature()} - {a.description}" if a.description else a.signature() for a in actions) + ".")
    if emotions:
        lines.append(f"Emotions: {', '.join(emotions)}.")
    return "\n".join(lines)


def pick(declared: Sequence[Action], requested: Iterable[Action]) -> tuple[Action, ...]:
    """The actions valid right now: a request's list over the persona's declarations.

    A requested action with only a name means the persona's action of that name (its description and
    arguments); one with a description or arguments of its own is used as given.
    """
    by_name = {a.name: a for a in declared}
    out = []
    for action in requested:
        if action.args is None and not action.description and action.name in by_name:
            out.append(by_name[action.name])
        else:
            out.append(action)
    return tuple(out)


def canonical(schema: dict[str, Any]) -> str:
    """One text per schema, the key the engine caches compiled grammars by. Keys keep their order (not sorted):
    the grammar writes properties in the schema's order, and `say` must come first."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def schema_problem(schema: Any) -> str | None:
    """None when `schema` is a valid JSON Schema (draft 2020-12), else `path: what is wrong` (path in JSON Path
    form, `$.properties.price.type`), from jsonschema's own meta-schema check."""
    import jsonschema  # pure Python; imported here so the loader stays quick for files without actions

    if not isinstance(schema, dict):
        return f"$: must be a JSON object (a schema), got {type(schema).__name__}"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(
        jsonschema.Draft202012Validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    return f"{error.json_path}: {error.message}"


def text_field(schema: dict[str, Any]) -> str | None:
    """The top-level string field streamed as text: `say` when the schema has one, else none."""
    prop = (schema.get("properties") or {}).get(SAY_FIELD) if isinstance(schema, dict) else None
    return SAY_FIELD if isinstance(prop, dict) and prop.get("type") == "string" else None
