"""Turning a persona and a request into token ids, in the base model's chat format.

Two properties matter more than anything else here:

* The system turn is tokenized on its own, so its ids are the same for every
  request of a persona; the engine keeps their KV cache (`prefix_len`).
* A conversation's earlier exchanges are real chat turns (user, then the NPC's
  reply as the assistant), each rendered exactly as the model saw it when it
  was new, so the next line's prompt extends the last one token for token and
  the engine reuses its keys and values (everything but the new line).
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

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


@dataclass(frozen=True)
class Exchange:
    """An earlier exchange of a conversation, as the model saw it: the user turn's content (neutralised, as
    rendered when it was new: context, the lines since the NPC last spoke, the line) and the NPC's reply."""

    user: str
    reply: str


@dataclass(frozen=True)
class Budget:
    """How many tokens a prompt may have, and how a conversation's window moves when it is full.

    When the earlier exchanges no longer fit, the oldest are dropped until the prompt is at most `low_water`:
    the window then stays put for the next few lines, so their prompts keep extending each other (a moving
    window would change the prompt's beginning every line, and no earlier KV could be reused). A conversation
    moves its window ahead of time, once its next prompt would pass `move_at`: the new beginning's KV is
    computed in the background while lines go on in the old window (npcd.service.dialogue)."""

    tokens: int      # max_seq_len minus the reply's room
    low_water: int   # after a drop the prompt is at most this long
    move_at: int     # a conversation's next prompt past this: its window moves in the background

    @classmethod
    def for_reply(cls, max_seq_len: int, reply_tokens: int) -> "Budget":
        tokens = max(1, max_seq_len - reply_tokens)
        return cls(tokens, tokens // 2, tokens * 3 // 4)


@dataclass
class Prompt:
    ids: list[int]
    prefix_len: int  # ids[:prefix_len] is the persona's system turn, the same for all its requests
    text: str
    user_turn: str = ""      # the new user turn's content: a conversation stores it as its next Exchange.user
    user_tokens: int = 0     # the new user turn's tokens, markers included
    history_kept: int = 0    # leading request-history turns dropped to fit the budget are not counted
    first_exchange: int = 0  # the first earlier exchange the prompt holds (== len(earlier): none)


class PromptTooLong(PromptError):
    """The new line alone does not fit the prompt budget (its message names the field and the numbers)."""


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
    assistant_close: str  # after an earlier reply, before the next user turn (starts with end_of_turn)

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
        two_turns = render(["system", "user", "assistant", "user"], True)
        system_open, system_close = system_only.split(s)
        between, assistant_open = with_user.split(s, 1)[1].split(u)
        if not between.startswith(system_close):
            raise ValueError("unsupported chat template: the system turn's end is not followed by the user turn")
        end_of_turn = full.split(a, 1)[1].rstrip()
        if not end_of_turn:
            raise ValueError("unsupported chat template: nothing marks the end of an assistant turn")
        user_open = between[len(system_close):]
        assistant_close = two_turns.split(a, 1)[1].split(user_open + u, 1)[0]
        if not assistant_close.startswith(end_of_turn):
            raise ValueError("unsupported chat template: an assistant turn is not closed by its end-of-turn marker")
        return cls(system_open, system_close, user_open, assistant_open, end_of_turn, assistant_close)


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

    def _user_turn(self, persona: "Persona", menu: str, **fields: Any) -> str:
        content = self._user_content(persona, **fields)
        return content + "\n\n" + self.neutralise(menu) if menu else content

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one builder per daemon; exchanges recur every line
    def _exchange_ids(self, user: str, reply: str) -> tuple[int, ...]:
        f = self.format
        return tuple(self._marker_ids(f.user_open) + self._content_ids(user) + self._marker_ids(f.assistant_open)
                     + self._content_ids(self.neutralise(reply)) + self._marker_ids(f.assistant_close))

    def build(self, persona: "Persona", *, speaker: str, line: str, history: Sequence[Any] = (),
              context: Mapping[str, Any] | None = None, npc_id: str = "", menu: str = "",
              earlier: Sequence[Exchange] = (), summary: str = "", keep_from: int = 0,
              budget: Budget | None = None) -> Prompt:
        """The prompt: the persona's system turn, the `earlier` exchanges from `keep_from` on (a conversation's
        window), then the new user turn (its history, context, the line, and a structured line's `menu`).

        `summary` (what dropped exchanges said) opens the first user turn. With a `budget`, the oldest earlier
        exchanges are dropped when the prompt does not fit (down to the budget's low water), then the oldest
        history turns, then the summary; the new line itself is never cut: when it alone does not fit,
        PromptTooLong names the field. `menu`: a structured line's actions and emotions
        (npcd.personas.actions.menu), closing the user turn; the system turn stays the persona's own, so free
        and structured lines share its cached KV."""
        system_ids, system_text = self.system_turn(persona)
        fields = dict(speaker=speaker, line=line, context=context, npc_id=npc_id)
        history = list(history)
        f = self.format
        opening = self.opening(summary)

        def user_ids(content: str) -> list[int]:
            return self._marker_ids(f.user_open) + self._content_ids(content) + self._marker_ids(f.assistant_open)

        def fits(turns: list[Any]) -> bool:
            text = self._user_turn(persona, menu, history=turns, **fields)
            return len(system_ids) + len(user_ids(opening + text)) <= budget.tokens  # type: ignore[union-attr]

        kept = history
        if budget is not None and not fits(kept):
            if not fits([]):
                opening = ""  # the summary goes before the line does
                self._check_alone(persona, fits, system_ids, budget, menu, fields)
            lo, hi = -1, len(history)  # the fewest oldest turns to drop: fits(history[hi:]), not fits(history[lo:])
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(history[mid:]) else (mid, hi)
            kept = history[hi:]
        content = self._user_turn(persona, menu, history=kept, **fields)

        def window(start: int) -> list[int]:
            """Ids after the system turn: the exchanges from `start`, the summary opening the first user turn."""
            return self.earlier_ids(earlier[start:], opening) + user_ids(
                content if start < len(earlier) else opening + content)

        start = min(keep_from, len(earlier))
        ids = window(start)
        if budget is not None and len(system_ids) + len(ids) > budget.tokens:
            start += 1
            while start < len(earlier) and len(system_ids) + len(window(start)) > budget.low_water:
                start += 1
            ids = window(start)
            if len(system_ids) + len(ids) > budget.tokens:  # the summary and the line fitted, the line alone does
                opening = ""
                ids = window(start)
        text = system_text + self.tokenizer.decode(ids)
        return Prompt(ids=system_ids + ids, prefix_len=len(system_ids), text=text, user_turn=content,
                      user_tokens=len(user_ids(content)),
                      history_kept=len(kept), first_exchange=start)

    def earlier_ids(self, earlier: Sequence[Exchange], opening: str) -> list[int]:
        """The ids of earlier exchanges as every prompt holds them, `opening` (a summary) before the first."""
        out: list[int] = []
        for i, e in enumerate(earlier):
            out += self._exchange_ids(opening + e.user if i == 0 else e.user, e.reply)
        return out

    def opening(self, summary: str) -> str:
        """What opens a conversation's first user turn when it has a summary."""
        return self.neutralise(f"(Earlier in this conversation: {summary.strip()})\n") if summary.strip() else ""

    def beginning(self, persona: "Persona", earlier: Sequence[Exchange], summary: str) -> list[int]:
        """The ids every prompt of a conversation window begins with: the system turn, then its exchanges."""
        return self.system_turn(persona)[0] + self.earlier_ids(earlier, self.opening(summary))

    def window_start(self, persona: "Persona", earlier: Sequence[Exchange], summary: str, low_water: int) -> int:
        """Where a full conversation's window moves to: past the fewest oldest exchanges for the rest to take at
        most `low_water` tokens with the system turn (`build`'s rule when a prompt does not fit, less the new line:
        a background move has none yet)."""
        start = 0
        while start < len(earlier) and len(self.beginning(persona, earlier[start:], summary)) > low_water:
            start += 1
        return start

    def _check_alone(self, persona: "Persona", fits: Callable[[list[Any]], bool], system_ids: list[int],
                     budget: Budget, menu: str, fields: dict[str, Any]) -> None:
        """PromptTooLong unless the new line fits with no history: naming the line, or the context when the line
        would fit without it."""
        if fits([]):
            return
        alone = dict(fields, context=None)
        line_tokens = len(self._content_ids(self._user_turn(persona, menu, history=[], **alone)))
        room = budget.tokens - len(system_ids)
        which = "context" if line_tokens <= room else "line"
        raise PromptTooLong(
            f"{which}: the new line {'with its context ' if which == 'context' else ''}does not fit persona "
            f"{persona.id!r}'s prompt: {room} tokens are left for it (max_seq_len, less the persona's system turn "
            f"of {len(system_ids)} and the reply's room), the line alone needs {line_tokens}")

    def training_pair(self, persona: "Persona", example: "Example") -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) for one example, in exactly the inference format.

        The reply ends with the end-of-turn token, so the adapter also learns when to stop.
        """
        prompt = self.build(persona, speaker=example.speaker, line=example.line, context=example.context)
        reply = self._content_ids(self.neutralise(example.reply.strip())) + self._marker_ids(self.format.end_of_turn)
        return prompt.ids, reply
