"""A structured reply read while it is generated: the spoken line as text deltas, each other field when complete.

The grammar guarantees the text is a prefix of one valid JSON object, so this
never has to recover from bad input; it only has to know, character by
character, where it is. A small scanner tracks string, escape and nesting
state at the top level (which key is open, when its value ends); the value of
a finished field is parsed with the standard `json`, and the partial line is
decoded by `jiter`'s partial mode, which handles escapes split across tokens
(`\\u00` then `e9`) and surrogate pairs, and never returns half a character.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jiter


@dataclass
class ReplyStream:
    text_field: str | None            # top-level string streamed as text ("say"); None: nothing is streamed
    raw: str = ""                     # the reply so far
    text: str = ""                    # the streamed field's characters sent so far
    complete: bool = False            # the object is closed
    fields: dict[str, Any] = field(default_factory=dict)  # finished top-level fields, in order
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _expect_key: bool = False         # at depth 1, the next string is a key
    _key_start: int = -1
    _key: str | None = None           # the top-level key whose value is being generated
    _value_start: int = -1

    @property
    def in_text(self) -> bool:
        """Inside the streamed field's string: where the engine may close the line when its budget is spent."""
        return (self._in_string and self._depth == 1 and not self._expect_key
                and self._key is not None and self._key == self.text_field)

    def feed(self, delta: str) -> tuple[str, list[tuple[str, Any]]]:
        """Adds generated text; returns (new characters of the spoken line, fields completed by it)."""
        done: list[tuple[str, Any]] = []
        base = len(self.raw)
        self.raw += delta
        for offset, char in enumerate(delta):
            self._scan(base + offset, char, done)
        return self._text_delta(), done

    def _scan(self, pos: int, char: str, done: list[tuple[str, Any]]) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                if self._depth == 1 and self._expect_key:
                    self._key = json.loads(self.raw[self._key_start:pos + 1])
            return
        if char == '"':
            self._in_string = True
            if self._depth == 1 and self._expect_key:
                self._key_start = pos
        elif char == ":" and self._depth == 1:
            self._expect_key = False
            self._value_start = pos + 1
        elif char in "{[":
            self._depth += 1
            if self._depth == 1:
                self._expect_key = True
        elif char in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._close_field(pos, done)
                self.complete = True
        elif char == "," and self._depth == 1:
            self._close_field(pos, done)
            self._expect_key = True

    def _close_field(self, end: int, done: list[tuple[str, Any]]) -> None:
        if self._key is None or self._value_start < 0:
            return  # `{}`: no field was open
        value = json.loads(self.raw[self._value_start:end])
        self.fields[self._key] = value
        done.append((self._key, value))
        self._key, self._value_start = None, -1

    def _text_delta(self) -> str:
        if self.text_field is None or (self._key != self.text_field and self.text_field not in self.fields):
            return ""
        if self.text_field in self.fields:
            value = self.fields[self.text_field]
        else:
            value = jiter.from_json(self.raw.encode(), partial_mode="trailing-strings").get(self.text_field, "")
        if not isinstance(value, str) or len(value) <= len(self.text):
            return ""
        delta, self.text = value[len(self.text):], value
        return delta
