"""One request inside the engine: its prompt, what it has generated, and where it is in its life."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from npcd.engine.adapters import AdapterVersion
from npcd.engine.api import STRUCTURE_TOKENS, Event, GenerationRequest
from npcd.engine.detokenizer import IncrementalDetokenizer
from npcd.engine.grammar import RowGrammar
from npcd.engine.kv_cache import PrefixCache
from npcd.engine.sampler import SamplerState

Sink = Callable[[Event], None]  # called on the engine thread with each of the request's events


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter: AdapterVersion | None
    sink: Sink
    sampler: SamplerState
    detok: IncrementalDetokenizer
    grammar: RowGrammar | None = None  # structured requests: the grammar its tokens follow
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cached: int = 0               # prompt tokens whose KV came from the prefix cache
    reusable: int = 0             # prompt tokens the prefix cache held when it was queued (step budget estimate)
    kv_len: int = 0               # tokens whose KV is in the sequence's slot
    pending_prefix: tuple | None = None  # prefix-cache key to store once its tokens are prefilled
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def client(self) -> str:
        return self.request.client

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    @property
    def token_budget(self) -> int:
        """Tokens it may generate: max_tokens, and for a structured reply the JSON around the line too."""
        return self.request.sampling.max_tokens + (STRUCTURE_TOKENS if self.grammar is not None else 0)

    @property
    def prefilled(self) -> bool:
        """Its whole prompt is in the KV cache: it decodes from now on."""
        return self.kv_len >= len(self.request.prompt_ids)

    @property
    def lora_slot(self) -> int:
        """The LoRA stack slot this row reads, or -1 for the base model alone."""
        return self.adapter.slot if self.adapter else -1

    @property
    def cacheable_prefix(self) -> int:
        """Prompt tokens the prefix cache may hold (the persona's system turn); 0 when none applies."""
        p = self.request.prefix_len
        return p if 0 < p < len(self.prompt) else 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens its prefill will compute, for the step budget: the persona prefix is counted as cached
        (after a persona's first line it is), and what a conversation entry held when it was queued."""
        return len(self.prompt) - max(self.cacheable_prefix, self.reusable)

    @property
    def version_key(self) -> tuple | None:
        """The adapter version its KV is computed with (cache entries of other versions never apply)."""
        return (self.adapter.name, self.adapter.version) if self.adapter else None

    def system_key(self) -> tuple | None:
        """Prefix-cache key of its persona's system turn, or None when it has none to share."""
        p = self.cacheable_prefix
        return (self.version_key, tuple(self.prompt[:p])) if p else None

    def conversation_key(self) -> tuple | None:
        """Prefix-cache key of its conversation (its last line's prompt and reply), or None outside one."""
        key = self.request.cache_key
        return (self.version_key, PrefixCache.CONVERSATION, key) if key else None

    def cache_keys(self) -> list[tuple]:
        return [k for k in (self.system_key(), self.conversation_key()) if k is not None]
