"""Persona files (`personas/*.yaml`): parsed, validated and pinned to their source lines.

Personas are written by game designers, not programmers, so every mistake must
come back as one precise message, `file:line: field: what is wrong`. We keep the
YAML node tree next to the parsed data so that a value found wrong during
validation can still be traced to the line it came from.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from npcd.engine.api import SAMPLING_BOUNDS, STOP_CHARS, STOP_STRINGS, SamplingParams
from npcd.personas.actions import (
    ACTION_NAME,
    EMOTION_CHARS,
    MAX_ACTIONS,
    MAX_EMOTIONS,
    Action,
    action_args_problem,
    canonical,
    reply_schema,
)
from npcd.personas.prompt import DEFAULT_TEMPLATE, TemplateProblem, check_template

ID_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOP_LEVEL_KEYS = (
    "id", "display_name", "description", "adapter", "system_prompt", "template",
    "sampling", "stop", "few_shot", "examples", "metadata", "actions", "emotions", "situations", "memory",
)
REQUIRED_KEYS = ("id", "display_name", "description", "system_prompt")
EXAMPLE_KEYS = ("speaker", "line", "reply", "context")
ACTION_KEYS = ("name", "description", "args")
SITUATION_KEYS = ("speaker", "line", "context", "expect")
MEMORY_KEYS = ("when_full", "summary_tokens")
WHEN_FULL = ("drop", "summarize")
SUMMARY_TOKENS = (16, 256)  # bounds of memory.summary_tokens: a summary long enough to keep facts, short
                            # enough that it never crowds the turns it stands for out of the prompt

# In every run of 20 examples these positions are held out for evaluation: a fixed
# 15% split by index, so training and evaluation never disagree on which is which.
HELD_OUT_POSITIONS = frozenset({6, 13, 19})


def is_held_out(index: int) -> bool:
    return index % 20 in HELD_OUT_POSITIONS


class PersonaError(ValueError):
    """A persona file is wrong; names the file, the line (when known) and the field."""

    def __init__(self, file: str | Path, line: int | None, field: str | None, message: str):
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        where = self.file if line is None else f"{self.file}:{line}"
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class SamplingDefaults:
    """A persona's sampling; requests may override each value.

    Its fields are exactly SAMPLING_BOUNDS' keys (a test holds them to it), which
    is what lets `_sampling` and `Persona.sampling_params` walk the table.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    max_tokens: int = 60


@dataclass(frozen=True)
class Example:
    """One exchange in the persona's voice: used for few-shot prompts, training and evaluation."""

    speaker: str
    line: str
    reply: str
    context: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Situation:
    """A labelled moment for `npcd eval`: a line said to the NPC and the actions that fit it."""

    speaker: str
    line: str
    expect: tuple[str, ...]
    context: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Memory:
    """What a conversation does when its turns no longer fit the prompt: the oldest are dropped, or folded into a
    summary the persona writes itself (its adapter, its voice) in at most `summary_tokens`."""

    when_full: str = "drop"
    summary_tokens: int = 96


@dataclass(frozen=True)
class Persona:
    id: str
    display_name: str
    description: str
    adapter_path: Path | None
    system_prompt: str
    template: str
    sampling: SamplingDefaults
    stop: tuple[str, ...]
    few_shot: int
    examples: tuple[Example, ...]
    metadata: dict[str, Any] = field(hash=False)
    source: Path
    digest: str
    actions: tuple[Action, ...] = ()
    emotions: tuple[str, ...] = ()
    situations: tuple[Situation, ...] = ()
    memory: Memory = field(default_factory=Memory)

    @property
    def train_examples(self) -> tuple[Example, ...]:
        return tuple(e for i, e in enumerate(self.examples) if not is_held_out(i))

    @property
    def held_out_examples(self) -> tuple[Example, ...]:
        """About 15% of the examples, never trained on and never used as few-shot demonstrations."""
        return tuple(e for i, e in enumerate(self.examples) if is_held_out(i))

    @property
    def few_shot_examples(self) -> tuple[Example, ...]:
        return self.train_examples[: self.few_shot]

    def sampling_params(self, seed: int | None = None, overrides: Mapping[str, float] | None = None,
                        extra_stop: Sequence[str] = ()) -> SamplingParams:
        """The persona's defaults as engine sampling, a request's changes on top.

        The one place persona defaults become SamplingParams: the daemon (via
        `sampling_for`), `npcd eval` and the demos all come through here, so they
        sample alike. `overrides` replaces defaults by SAMPLING_BOUNDS field name
        (its values already checked); `extra_stop` adds the stop strings the
        persona does not have yet.
        """
        values = asdict(self.sampling) | dict(overrides or {})
        stop = self.stop + tuple(s for s in extra_stop if s not in self.stop)
        return SamplingParams(**values, seed=seed, stop=stop)

    def reply_schema(self, actions: Sequence[Action] | None = None) -> str:
        """The JSON Schema text of its structured lines: its emotions, and its actions or those valid now."""
        return canonical(reply_schema(self.actions if actions is None else actions, self.emotions))

    @property
    def default_adapter_dir(self) -> Path:
        """Where `npcd train` writes when the file names no `adapter:`."""
        return self.source.parent / "adapters" / self.id


class _Source:
    """The parsed YAML plus its node tree, to find the line of any value by its key path."""

    def __init__(self, path: Path, text: str):
        self.path = path
        try:
            loader = yaml.SafeLoader(text)
            try:
                self.node = loader.get_single_node()
                if self.node is not None:
                    self._check_duplicate_keys(self.node, "")
                self.data = loader.construct_document(self.node) if self.node is not None else None
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            raise PersonaError(path, line, None, f"invalid YAML: {exc.problem or exc}") from None
        except yaml.YAMLError as exc:
            raise PersonaError(path, None, None, f"invalid YAML: {exc}") from None

    def _check_duplicate_keys(self, node: yaml.Node, prefix: str) -> None:
        # PyYAML silently keeps the last of two equal keys; a designer editing the
        # first one would see no effect, so this is an error.
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                dotted = f"{prefix}.{key}" if prefix else key
                if key in seen:
                    raise PersonaError(self.path, key_node.start_mark.line + 1, dotted, "duplicate key")
                seen.add(key)
                self._check_duplicate_keys(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicate_keys(item, f"{prefix}[{i}]")

    def line(self, keys: Sequence[str | int], *, key_line: bool = False) -> int | None:
        """1-based line of the value at `keys` (or of its key), else of its nearest parent."""
        node, found = self.node, self.node
        key_node = None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == key), None)
                if match is None:
                    break
                key_node, node = match
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                key_node, node = None, node.value[key]
            else:
                break
            found = node
        target = key_node if key_line and key_node is not None else found
        return target.start_mark.line + 1 if target is not None else None

    def text_line(self, keys: Sequence[str | int], line_in_text: int | None) -> int | None:
        """File line of line `line_in_text` (1-based) inside the string value at `keys`."""
        start = self.line(keys)
        if start is None or line_in_text is None:
            return start
        node = self.node
        for key in keys:
            node = next(v for k, v in node.value if k.value == key)
        # A block scalar (`key: |`) starts on the line after its indicator.
        block = isinstance(node, yaml.ScalarNode) and node.style in ("|", ">")
        return start + line_in_text - (0 if block else 1)

    def error(self, keys: Sequence[str | int], message: str, *, key_line: bool = False) -> PersonaError:
        return PersonaError(self.path, self.line(keys, key_line=key_line), _dotted(keys), message)


def _dotted(keys: Sequence[str | int]) -> str | None:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out or None


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _check_keys(src: _Source, keys: Sequence[str | int], data: dict, known: Sequence[str]) -> None:
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            raise src.error([*keys, key], f"unknown key{did_you_mean}", key_line=True)


def _string(src: _Source, keys: Sequence[str | int], value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise src.error(keys, f"must be a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise src.error(keys, "must not be empty")
    return value


def _mapping(src: _Source, keys: Sequence[str | int], value: Any) -> dict:
    if not isinstance(value, dict):
        raise src.error(keys, f"must be a mapping, got {_describe(value)}")
    return value


def _sampling(src: _Source, value: Any) -> SamplingDefaults:
    data = _mapping(src, ["sampling"], value)
    _check_keys(src, ["sampling"], data, tuple(SAMPLING_BOUNDS))
    values: dict[str, Any] = {}
    for name, raw in data.items():
        bound = SAMPLING_BOUNDS[name]
        keys = ["sampling", name]
        ok_type = isinstance(raw, int) if bound.kind is int else isinstance(raw, (int, float))
        if isinstance(raw, bool) or not ok_type:
            raise src.error(keys, f"must be {'an integer' if bound.kind is int else 'a number'}, got {_describe(raw)}")
        problem = bound.check(raw, plain=True)
        if problem:
            raise src.error(keys, problem)
        values[name] = bound.kind(raw)
    return SamplingDefaults(**values)


def _examples(src: _Source, value: Any) -> tuple[Example, ...]:
    if not isinstance(value, list):
        raise src.error(["examples"], f"must be a list, got {_describe(value)}")
    out = []
    for i, item in enumerate(value):
        keys: list[str | int] = ["examples", i]
        data = _mapping(src, keys, item)
        _check_keys(src, keys, data, EXAMPLE_KEYS)
        for required in ("speaker", "line", "reply"):
            if required not in data:
                raise src.error(keys, f"misses the required key {required!r}")
        context = _mapping(src, [*keys, "context"], data.get("context", {}) or {})
        out.append(Example(
            speaker=_string(src, [*keys, "speaker"], data["speaker"]),
            line=_string(src, [*keys, "line"], data["line"]),
            reply=_string(src, [*keys, "reply"], data["reply"]),
            context=_context(src, [*keys, "context"], context),
        ))
    return tuple(out)


def _context(src: _Source, keys: list[str | int], data: dict) -> dict[str, str]:
    # Requests carry context as string to string (a protobuf map), so examples do too.
    out = {}
    for key, raw in data.items():
        if isinstance(raw, (dict, list)) or raw is None:
            raise src.error([*keys, key], f"must be a plain value (text or number), got {_describe(raw)}")
        out[str(key)] = raw if isinstance(raw, str) else str(raw).lower() if isinstance(raw, bool) else str(raw)
    return out


def _stop(src: _Source, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise src.error(["stop"], f"must be a list of strings, got {_describe(value)}")
    if len(value) not in STOP_STRINGS:
        raise src.error(["stop"], f"must hold {STOP_STRINGS.describe()}, got {len(value)}")
    for i, stop in enumerate(value):
        if not isinstance(stop, str):
            raise src.error(["stop", i], f"must be a string, got {_describe(stop)}")
        problem = STOP_CHARS.check(len(stop))
        if problem:
            raise src.error(["stop", i], problem)
    return tuple(value)


def _list(src: _Source, keys: list[str | int], value: Any, limit: int | None = None) -> list:
    if not isinstance(value, list):
        raise src.error(keys, f"must be a list, got {_describe(value)}")
    if limit is not None and len(value) > limit:
        raise src.error(keys, f"must hold at most {limit} entries, got {len(value)}")
    return value


def _emotions(src: _Source, value: Any) -> tuple[str, ...]:
    out: list[str] = []
    for i, raw in enumerate(_list(src, ["emotions"], value, MAX_EMOTIONS)):
        label = _string(src, ["emotions", i], raw)
        if len(label) > EMOTION_CHARS:
            raise src.error(["emotions", i], f"at most {EMOTION_CHARS} characters, got {len(label)}")
        if label in out:
            raise src.error(["emotions", i], f"{label!r} is listed twice")
        out.append(label)
    return tuple(out)


def _actions(src: _Source, value: Any) -> tuple[Action, ...]:
    out: list[Action] = []
    for i, item in enumerate(_list(src, ["actions"], value, MAX_ACTIONS)):
        keys: list[str | int] = ["actions", i]
        data = _mapping(src, keys, item)
        _check_keys(src, keys, data, ACTION_KEYS)
        if "name" not in data:
            raise src.error(keys, "misses the required key 'name'")
        name = _string(src, [*keys, "name"], data["name"])
        if not ACTION_NAME.fullmatch(name):
            raise src.error([*keys, "name"], f"must match {ACTION_NAME.pattern} (lowercase, digits, _), got {name!r}")
        if any(a.name == name for a in out):
            raise src.error([*keys, "name"], f"action {name!r} is declared twice")
        description = _string(src, [*keys, "description"], data["description"]) if "description" in data else ""
        args = None
        if "args" in data:
            args = _mapping(src, [*keys, "args"], data["args"])
            problem = action_args_problem(args)
            if problem:
                raise src.error([*keys, "args"], problem)
        out.append(Action(name=name, description=description.strip(), args=args))
    return tuple(out)


def _situations(src: _Source, value: Any, actions: tuple[Action, ...]) -> tuple[Situation, ...]:
    names = [a.name for a in actions]
    out = []
    for i, item in enumerate(_list(src, ["situations"], value)):
        keys: list[str | int] = ["situations", i]
        data = _mapping(src, keys, item)
        _check_keys(src, keys, data, SITUATION_KEYS)
        for required in ("line", "expect"):
            if required not in data:
                raise src.error(keys, f"misses the required key {required!r}")
        expect = data["expect"] if isinstance(data["expect"], list) else [data["expect"]]
        for name in expect:
            if name not in names:
                known = ", ".join(names) or "none: declare `actions` first"
                raise src.error([*keys, "expect"], f"{name!r} is not one of this persona's actions ({known})")
        out.append(Situation(
            speaker=_string(src, [*keys, "speaker"], data["speaker"]) if "speaker" in data else "Player",
            line=_string(src, [*keys, "line"], data["line"]),
            expect=tuple(expect),
            context=_context(src, [*keys, "context"], _mapping(src, [*keys, "context"], data.get("context") or {})),
        ))
    return tuple(out)


def _memory(src: _Source, value: Any) -> Memory:
    data = _mapping(src, ["memory"], value)
    _check_keys(src, ["memory"], data, MEMORY_KEYS)
    when_full = data.get("when_full", Memory.when_full)
    if when_full not in WHEN_FULL:
        raise src.error(["memory", "when_full"], f"must be one of {', '.join(WHEN_FULL)}, got {_describe(when_full)}")
    tokens = data.get("summary_tokens", Memory.summary_tokens)
    low, high = SUMMARY_TOKENS
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not low <= tokens <= high:
        raise src.error(["memory", "summary_tokens"], f"must be an integer in {low}..{high}, got {_describe(tokens)}")
    return Memory(when_full=when_full, summary_tokens=tokens)


def _adapter(src: _Source, value: Any, require: bool, persona_id: str) -> Path:
    raw = _string(src, ["adapter"], value)
    path = (src.path.parent / raw).resolve()
    if require:
        if not path.is_dir():
            raise src.error(["adapter"], f"adapter directory {path} does not exist (train it with: npcd train {persona_id})")
        for name in ADAPTER_FILES:
            if not (path / name).is_file():
                raise src.error(["adapter"], f"adapter directory {path} has no {name}")
    return path


def _digest(text: bytes, adapter: Path | None) -> str:
    """Changes whenever the file or any file of its adapter changes (mtime or size)."""
    h = hashlib.sha256(text)
    if adapter is not None and adapter.is_dir():
        for f in sorted(p for p in adapter.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"\0{f.relative_to(adapter)}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    return h.hexdigest()[:16]


def load_persona(path: str | Path, *, require_adapter: bool = True) -> Persona:
    """Parse and validate one persona file.

    `require_adapter=False` accepts an `adapter:` directory that does not exist
    yet: that is how `npcd train` finds where to write a persona's first adapter.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise PersonaError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PersonaError(path, None, None, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    src = _Source(path, text)
    if src.data is None:
        raise PersonaError(path, None, None, "the file is empty")
    data = _mapping(src, [], src.data)
    _check_keys(src, [], data, TOP_LEVEL_KEYS)
    for required in REQUIRED_KEYS:
        if required not in data:
            raise PersonaError(path, 1, required, "missing (this field is required)")

    persona_id = _string(src, ["id"], data["id"])
    if not ID_PATTERN.fullmatch(persona_id):
        raise src.error(["id"], f"must match [a-z][a-z0-9_]{{0,63}} (lowercase, digits, _), got {persona_id!r}")

    examples = _examples(src, data["examples"]) if "examples" in data else ()
    few_shot = data.get("few_shot", 0)
    if isinstance(few_shot, bool) or not isinstance(few_shot, int) or few_shot < 0:
        raise src.error(["few_shot"], f"must be an integer >= 0, got {_describe(few_shot)}")
    n_train = sum(1 for i in range(len(examples)) if not is_held_out(i))
    if few_shot > n_train:
        raise src.error(["few_shot"], f"asks for {few_shot} demonstrations but only {n_train} training examples exist")

    template = _string(src, ["template"], data["template"]) if "template" in data else DEFAULT_TEMPLATE
    try:
        check_template(template)
    except TemplateProblem as exc:
        raise PersonaError(path, src.text_line(["template"], exc.line), "template", exc.message) from None

    adapter = _adapter(src, data["adapter"], require_adapter, persona_id) if "adapter" in data else None
    metadata = _mapping(src, ["metadata"], data["metadata"]) if "metadata" in data else {}
    actions = _actions(src, data["actions"]) if "actions" in data else ()
    return Persona(
        id=persona_id,
        display_name=_string(src, ["display_name"], data["display_name"]),
        description=_string(src, ["description"], data["description"]),
        adapter_path=adapter,
        system_prompt=_string(src, ["system_prompt"], data["system_prompt"]).strip(),
        template=template,
        sampling=_sampling(src, data["sampling"]) if "sampling" in data else SamplingDefaults(),
        stop=_stop(src, data["stop"]) if "stop" in data else (),
        few_shot=few_shot,
        examples=examples,
        metadata=metadata,
        source=path.resolve(),
        digest=_digest(raw, adapter),
        actions=actions,
        emotions=_emotions(src, data["emotions"]) if "emotions" in data else (),
        situations=_situations(src, data["situations"], actions) if "situations" in data else (),
        memory=_memory(src, data["memory"]) if "memory" in data else Memory(),
    )


def load_dir(directory: str | Path) -> tuple[dict[str, Persona], list[PersonaError]]:
    """Load every `*.yaml` of a directory; one bad file never hides the good ones.

    Returns the personas by id and the errors, sorted by file. Two files with the
    same id are both refused: guessing which one the designer meant would be worse.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"personas directory {directory} does not exist")
    errors: list[PersonaError] = []
    by_id: dict[str, list[Persona]] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            persona = load_persona(path)
        except PersonaError as exc:
            errors.append(exc)
            continue
        by_id.setdefault(persona.id, []).append(persona)
    personas: dict[str, Persona] = {}
    for persona_id, found in by_id.items():
        if len(found) == 1:
            personas[persona_id] = found[0]
            continue
        files = [p.source.name for p in found]
        for p in found:
            others = ", ".join(f for f in files if f != p.source.name)
            errors.append(PersonaError(directory / p.source.name, 1, "id",
                                       f"duplicate id {persona_id!r}: also used by {others}"))
    errors.sort(key=lambda e: (e.file, e.line or 0))
    return personas, errors
