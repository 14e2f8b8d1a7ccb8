"""The one small interface between the daemon and an inference backend.

The daemon renders prompts, tokenizes them and maps wire messages to these
types; a backend only generates. Our PyTorch engine (`npcd.engine.engine`) is the
first implementation. The shapes here were chosen so that a TensorRT-LLM
backend fits behind them too: an adapter is loaded once under a name (which
maps to a TensorRT-LLM LoRA task id), `max_lora_rank` and `max_resident`
mirror its LoRA cache limits, and requests carry token ids, not text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Protocol, Union


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS or a stop string
    LENGTH = "length"        # max_tokens or the engine's max sequence length
    CANCELLED = "cancelled"  # the caller cancelled (or disconnected)
    DEADLINE = "deadline"    # the request's deadline passed
    PREEMPTED = "preempted"  # an ambient line shed so that a player line could start at once
    ERROR = "error"          # this request failed; the others go on


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, load tests)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Bound:
    """The range a sampling value must lie in, and how a refusal says so.

    `check` words only the problem ("must be in [0, 2], got 3.5"): each caller
    names the field in its own error form (a persona file's `file:line: field:`,
    a wire request's `field:`, the engine's `request 'id': field`).
    """

    low: float
    high: float
    low_open: bool = False  # low itself is refused (top_p == 0 would keep no token)
    kind: type[int | float] = float
    unit: str = ""          # set for counts and lengths ("characters"): worded as "1 to 64 characters"

    def __contains__(self, value: float) -> bool:
        # NaN compares false both ways, so it is refused too
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self, *, plain: bool = False) -> str:
        """Interval notation for programmers (wire, engine); `plain` words for designers (persona files)."""
        low, high = _number(self.low), _number(self.high)
        if self.unit:
            span = f"at most {high}" if self.low == 0 else f"{low} to {high}"
            return f"{span} {self.unit}"
        if plain:
            return f"greater than {low} and at most {high}" if self.low_open else f"between {low} and {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}]"

    def check(self, value: float, *, plain: bool = False) -> str | None:
        """None when `value` is in range, else what is wrong with it, naming the limit."""
        return None if value in self else f"must be {self.describe(plain=plain)}, got {_number(value)}"

    def capped(self, high: float) -> Bound:
        """This bound under an operator's cap (`Limits.max_tokens`, `max_stop_strings`); a cap never widens it."""
        return replace(self, high=min(self.high, high))


# Every bound on SamplingParams' values, by field. The persona loader, the wire
# validation and the engine check against this table, and a test holds
# personas/schema.json (editor completion) to it, so none of them can drift.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1, 512, kind=int),
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(0, 1_000_000, kind=int),
    "repetition_penalty": Bound(1.0, 2.0),
}
# Stop strings in one list: a persona's own, or those one request adds (so the
# engine sees at most twice as many). The daemon's `Limits.max_stop_strings` may
# lower the request's share.
STOP_STRINGS = Bound(0, 8, kind=int, unit="strings")
STOP_CHARS = Bound(1, 64, kind=int, unit="characters")  # of each stop string


# Events one line may hold unread for a reader that stopped reading (about as many tokens of text): past it the
# line is cancelled, so a client that never reads cannot keep the engine generating for nobody.
UNREAD_EVENTS_MAX = 512


# Tokens a structured reply may spend beyond its max_tokens: the JSON around the line, the emotion label and
# the action with its arguments (enum labels and capped strings: npcd.personas.actions.ARG_STRING_MAX_CHARS).
# The shipped personas' replies use 20-40 of them. The service keeps them free in a structured line's prompt budget.
STRUCTURE_TOKENS = 128


@dataclass(frozen=True)
class StructuredOutput:
    """The reply must be JSON that follows `schema` (grammar-constrained decoding, per row of a batch).

    `text_field` names a top-level string the engine streams as TextDeltas while it is generated (decoded out of
    the JSON string, escapes and all): the NPC's spoken line. Every other top-level field arrives as a FieldDone
    event the moment its value is complete.
    """

    schema: str                   # JSON Schema text; equal texts share one compiled grammar
    text_field: str | None = None


# The daemon's own work (a conversation's next window, a summary): its prompt is computed a small chunk per step
# (npcd.engine.scheduler.AMBIENT_SHARE_DIVISOR of the budget), and not at all in a step where a player line's
# prompt is, so a game line never waits on it for more than one small step. Measured on a 2-core AVX2 CPU: a
# 494-token window computed at ambient priority took a whole 256-token step first and then shared every one,
# and the player lines beside it waited 250-390 ms for their first token against ~140 ms alone.
BACKGROUND_PRIORITY = -1


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None   # name given to load_adapter(); None runs the base model
    prefix_len: int = 0          # leading prompt tokens shared by a persona's requests (KV reused)
    priority: int = 0            # higher is scheduled first: player-facing 1 > ambient 0 > BACKGROUND_PRIORITY
    deadline: float | None = None  # time.monotonic() after which the request is ended
    structured: StructuredOutput | None = None  # None: free text
    client: str = ""             # who asked (a connection, or its x-npcd-client key): the unit of fair shares
    # A conversation's key: the KV of this line's prompt and reply is kept under it (bounded, LRU), and the next
    # line with the same key reuses the longest prefix its prompt shares with them.
    cache_key: str = ""


@dataclass(frozen=True)
class Started:
    request_id: str
    queue_position: int  # requests waiting ahead of this one when it was accepted


@dataclass(frozen=True)
class TextDelta:
    request_id: str
    text: str


@dataclass(frozen=True)
class FieldDone:
    """A structured reply's top-level field, complete: its key and JSON value (an emotion label, an action)."""

    request_id: str
    name: str
    value: object


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    queued_ms: float       # submit -> first scheduled
    first_token_ms: float  # submit -> first token (0 when none was produced)
    total_ms: float        # submit -> finished
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused (persona system turn, conversation)
    error: str | None = None
    json: str = ""  # structured requests: the whole reply as generated (valid JSON when reason is STOP)


Event = Union[Started, TextDelta, FieldDone, Finished]


class BackendError(Exception):
    """Base of the errors a backend raises at submit / adapter time."""


class QueueFull(BackendError):
    """The bounded admission queue is full (maps to RESOURCE_EXHAUSTED).

    `retry_after_ms`: the engine's estimate of when a place frees (the running line closest to its end, at
    the recent step time), so clients back off by what the engine sees rather than by a guess."""

    def __init__(self, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class UnknownAdapter(BackendError):
    """A request names an adapter that was never loaded (maps to NOT_FOUND)."""


class InvalidRequest(BackendError):
    """A request does not fit the engine (maps to INVALID_ARGUMENT)."""


class AdapterError(BackendError):
    """An adapter was refused; the message names the file or tensor and why."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]
    version: int
    resident: bool = False  # in the engine's adapter slots now (else reloaded from host memory on demand)
    warning: str = ""       # served, but something looks off (e.g. trained on another base); logged at load


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int
    running: int
    max_batch_size: int
    adapters_resident: int
    adapters_known: int
    tokens_generated: int    # since start
    prompt_tokens: int       # since start, prefilled (cache hits excluded)
    prefix_cache_hits: int
    prefix_cache_misses: int
    steps: int
    last_batch_size: int
    step_failures: int = 0   # engine steps that raised, since start
    last_error: str = ""     # the last step's error; "" once a step succeeds again (healthy)


class Backend(Protocol):
    """What the daemon needs from an inference backend."""

    tokenizer: object  # a transformers tokenizer for the base model

    @property
    def max_seq_len(self) -> int: ...

    def start(self) -> None: ...

    def shutdown(self, grace_s: float = 5.0) -> None: ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue a request; the iterator yields Started, TextDelta*, Finished.

        Raises QueueFull, UnknownAdapter or InvalidRequest before anything is queued.
        """
        ...

    def submit_many(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Event] | BackendError]:
        """One game tick, queued atomically so its requests join the same step.

        Returns per request its event stream or the BackendError it was refused with.
        """
        ...

    def cancel(self, request_id: str) -> None: ...

    def check_schema(self, schema: str) -> None:
        """Compiles a StructuredOutput schema now (cached for its requests); raises InvalidRequest naming what
        the grammar compiler could not take."""
        ...

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load (or replace) a PEFT adapter; running requests keep the version they started with."""
        ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> dict[str, AdapterInfo]: ...

    def stats(self) -> EngineStats: ...

    def describe(self) -> dict[str, object]:
        """The resolved fast path (device, weights mode and why, dtype, kernels, prefill policy, threads, sizes)."""
        ...
