"""Turning a persona and a request into token ids, in the base model's chat format.

Two properties matter more than anything else here:

* The system turn is tokenized on its own, so its ids are the same for every
  request of a persona; the engine keeps their KV cache (`prefix_len`).
* Text from the game (the player's line, names, history, context) is untrusted.
  It must never become a control token such as `<|im_start|>`, or a player could
  write a new system turn. Content is therefore neutralised (a zero-width space
  is put inside every special token string) and tokenized with special-token
  parsing switched off; only the chat format's own markers become special ids.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from npcd.personas.loader import Example, Persona

TEMPLATE_VARIABLES = ("speaker", "line", "history", "context", "npc_id", "persona")

# The user turn when a persona file has no `template:`. Context first (where and
# when), then the conversation so far, then the line to answer.
DEFAULT_TEMPLATE = """\
{% if context %}[{% for key, value in context|dictsort %}{{ key }}: {{ value }}{% if not loop.last %}; {% endif %}{% endfor %}]
{% endif %}
{% for turn in history %}{{ turn.speaker }}: {{ turn.text }}
{% endfor %}
{{ speaker }}: {{ line }}"""

_ZWSP = "\u200b"
_SENTINELS = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01"}


class TemplateProblem(Exception):
    """A persona template does not compile or render; `line` is 1-based within the template."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


class PromptError(ValueError):
    """A request's fields cannot be turned into a prompt (names the field)."""


@dataclass
class Prompt:
    ids: list[int]
    prefix_len: int  # ids[:prefix_len] is the persona's system turn, the same for all its requests
    text: str


_ENV = ImmutableSandboxedEnvironment(
    autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False
)


@functools.lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


_SAMPLE_VALUES: dict[str, Any] = {
    "speaker": "Player", "line": "Hello.", "history": [{"speaker": "Player", "text": "Hi."}],
    "context": {"location": "village"}, "npc_id": "npc_1", "persona": "Someone",
}


def check_template(source: str) -> None:
    """Raise TemplateProblem unless `source` compiles, uses only known variables and renders."""
    try:
        ast = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"template syntax error: {exc.message}", exc.lineno) from None
    unknown = sorted(meta.find_undeclared_variables(ast) - set(TEMPLATE_VARIABLES))
    if unknown:
        raise TemplateProblem(
            f"unknown variable(s) {', '.join(unknown)}; available: {', '.join(TEMPLATE_VARIABLES)}"
        )
    try:
        _compile(source).render(**_SAMPLE_VALUES)
    except Exception as exc:  # noqa: BLE001 - any render failure is the designer's to fix
        raise TemplateProblem(f"template fails to render: {exc}") from None


@dataclass(frozen=True)
class ChatFormat:
    """The base model's turn markers, read from its own chat template."""

    system_open: str
    system_close: str
    user_open: str
    assistant_open: str  # closes the user turn and opens the assistant's
    end_of_turn: str     # what ends an assistant reply (the model's stop token)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the base model's tokenizer has no chat template; npcd needs a chat model")

        def render(roles: Sequence[str], generation_prompt: bool) -> str:
            messages = [{"role": r, "content": _SENTINELS[r]} for r in roles]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )

        s, u, a = (_SENTINELS[r] for r in ("system", "user", "assistant"))
        system_only = render(["system"], False)
        with_user = render(["system", "user"], True)
        full = render(["system", "user", "assistant"], False)
        system_open, system_close = system_only.split(s)
        between, assistant_open = with_user.split(s, 1)[1].split(u)
        if not between.startswith(system_close):
            raise ValueError("unsupported chat template: the system turn's end is not followed by the user turn")
        end_of_turn = full.split(a, 1)[1].rstrip()
        if not end_of_turn:
            raise ValueError("unsupported chat template: nothing marks the end of an assistant turn")
        return cls(system_open, system_close, between[len(system_close):], assistant_open, end_of_turn)


def _history(history: Iterable[Any]) -> list[dict[str, str]]:
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, Mapping):
            speaker, text = turn.get("speaker"), turn.get("text")
        else:
            speaker, text = getattr(turn, "speaker", None), getattr(turn, "text", None)
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise PromptError(f"history[{i}] must have a text speaker and text, got {turn!r}")
        turns.append({"speaker": speaker, "text": text})
    return turns


class PromptBuilder:
    """Builds prompts for one tokenizer; caches each persona's tokenized system turn."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.format = ChatFormat.from_tokenizer(tokenizer)
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        specials.discard("")
        # Longest first, so a token that contains another is neutralised whole.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._system_cache: dict[str, tuple[str, list[int], str]] = {}  # persona id -> (digest, ids, text)

    # -- tokenization ------------------------------------------------------------
    def neutralise(self, text: str) -> str:
        """Break every special token string in `text` with a zero-width space."""
        return self._special_re.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)

    def _content_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _marker_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- rendering ---------------------------------------------------------------
    def _user_content(self, persona: "Persona", *, speaker: str, line: str, history: Iterable[Any],
                      context: Mapping[str, Any] | None, npc_id: str) -> str:
        for name, value in (("speaker", speaker), ("line", line), ("npc_id", npc_id)):
            if not isinstance(value, str):
                raise PromptError(f"{name} must be text, got {type(value).__name__}")
        context = dict(context or {})
        for key, value in context.items():
            if not isinstance(key, str) or not isinstance(value, (str, int, float)):
                raise PromptError(f"context[{key!r}] must map text to text, got {type(value).__name__}")
        try:
            rendered = _compile(persona.template).render(
                speaker=speaker, line=line, history=_history(history), npc_id=npc_id,
                context={k: str(v) for k, v in context.items()}, persona=persona.display_name,
            )
        except PromptError:
            raise
        except Exception as exc:  # noqa: BLE001 - the template is data; report it, do not crash
            raise PromptError(f"persona {persona.id!r}: template fails to render: {exc}") from None
        # Neutralised after rendering, so that two harmless pieces (say the line
        # and a history turn) cannot be joined by the template into a control token.
        return self.neutralise(rendered.strip())

    def _system_content(self, persona: "Persona") -> str:
        parts = [persona.system_prompt.strip()]
        shots = persona.few_shot_examples
        if shots:
            parts.append(f"Examples of how {persona.display_name} answers:")
            for ex in shots:
                user = self._user_content(persona, speaker=ex.speaker, line=ex.line, history=(),
                                          context=ex.context, npc_id="")
                parts.append(f"{user}\n{persona.display_name}: {ex.reply.strip()}")
        return self.neutralise("\n\n".join(parts))

    def system_turn(self, persona: "Persona") -> tuple[list[int], str]:
        """Ids and text of the persona's system turn (cached until the persona changes)."""
        cached = self._system_cache.get(persona.id)
        if cached is None or cached[0] != persona.digest:
            f = self.format
            content = self._system_content(persona)
            ids = self._marker_ids(f.system_open) + self._content_ids(content) + self._marker_ids(f.system_close)
            cached = (persona.digest, ids, f.system_open + content + f.system_close)
            self._system_cache[persona.id] = cached
        return list(cached[1]), cached[2]

    def build(self, persona: "Persona", *, speaker: str, line: str, history: Iterable[Any] = (),
              context: Mapping[str, Any] | None = None, npc_id: str = "", menu: str = "") -> Prompt:
        """`menu`: a structured line's actions and emotions (npcd.personas.actions.menu), closing the user
        turn; the system turn stays the persona's own, so free and structured lines share its cached KV."""
        system_ids, system_text = self.system_turn(persona)
        content = self._user_content(persona, speaker=speaker, line=line, history=history,
                                     context=context, npc_id=npc_id)
        if menu:
            content += "\n\n" + self.neutralise(menu)
        f = self.format
        user_ids = self._marker_ids(f.user_open) + self._content_ids(content) + self._marker_ids(f.assistant_open)
        return Prompt(ids=system_ids + user_ids, prefix_len=len(system_ids),
                      text=system_text + f.user_open + content + f.assistant_open)

    def training_pair(self, persona: "Persona", example: "Example") -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) for one example, in exactly the inference format.

        The reply ends with the end-of-turn token, so the adapter also learns when to stop.
        """
        prompt = self.build(persona, speaker=example.speaker, line=example.line, context=example.context)
        reply = self._content_ids(self.neutralise(example.reply.strip())) + self._marker_ids(self.format.end_of_turn)
        return prompt.ids, reply
