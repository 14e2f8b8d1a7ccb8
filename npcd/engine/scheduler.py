"""Who runs next: the waiting queue, the running batch's KV slots, and what each step holds.

The scheduler makes every decision of a step and touches no tensor but to
move a finished row's keys: which waiting requests are admitted (priority
first, then arrival; a KV slot free, the adapter resident, the step's prefill
token budget not exceeded), which running rows decode, which KV slot each
row owns, and which persona prefixes are served from the prefix cache. The
runner executes the plan; the postprocessor turns logits into text.

Player-facing lines go before ambient barks; within a priority, first come
first served.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TypeVar

from npcd.engine.config import EngineConfig
from npcd.engine.kv_cache import KVCache, PrefixCache, PrefixKV
from npcd.engine.sequence import Sequence


class Waiting(Protocol):
    priority: int
    done: bool
    prefill_tokens: int


W = TypeVar("W", bound=Waiting)


class WaitingQueue(Generic[W]):
    """Requests waiting for a slot, highest priority first, arrival order within a priority."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._heap: list[tuple[int, int, W]] = []
        self._order = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: W) -> int:
        """Queues an item; returns how many wait ahead of it."""
        ahead = sum(1 for p, _, w in self._heap if not w.done and -p >= item.priority)
        heapq.heappush(self._heap, (-item.priority, next(self._order), item))
        self._live += 1
        return ahead

    def discard(self, item: W) -> None:
        """Call after marking `item.done`; the heap entry is skipped lazily."""
        self._live -= 1

    def waiting(self) -> list[W]:
        return [w for _, _, w in self._heap if not w.done]

    def admit(self, free_slots: int, token_budget: int, can_run: Callable[[W], bool]) -> list[W]:
        """Pops, in priority order, the items that fit this step; the others keep their place."""
        chosen: list[W] = []
        kept: list[tuple[int, int, W]] = []
        tokens = 0  # prefill packs prompts, so a step costs the sum of their tokens, not rows x longest
        while self._heap and len(chosen) < free_slots:
            entry = heapq.heappop(self._heap)
            item = entry[2]
            if item.done:
                continue
            if chosen and tokens + item.prefill_tokens > token_budget:
                kept.append(entry)
                break
            if not can_run(item):
                kept.append(entry)
                continue
            chosen.append(item)
            tokens += item.prefill_tokens
        for entry in kept:
            heapq.heappush(self._heap, entry)
        self._live -= len(chosen)
        return chosen


@dataclass
class StepPlan:
    """What one forward pass computes. Rows keep this order in the logits: decode, then prefill."""

    decode: list[Sequence]                                   # running rows, KV slots 0..len-1, one token each
    prefill: list[Sequence]                                  # newcomers, in the KV slots after the running rows
    start_slot: int                                          # KV slot of the first newcomer
    prefix_hits: list[tuple[int, PrefixKV]] = field(default_factory=list)   # (slot, KV) to copy in first
    prefix_misses: list[tuple[int, tuple, int]] = field(default_factory=list)  # (slot, key, length) to keep

    @property
    def rows(self) -> list[Sequence]:
        return self.decode + self.prefill


class Scheduler:
    """Owns the waiting queue and the running batch (index in `running` == KV slot)."""

    def __init__(self, config: EngineConfig, kv: KVCache, prefix_cache: PrefixCache,
                 can_run: Callable[[Sequence], bool]):
        self.waiting: WaitingQueue[Sequence] = WaitingQueue(config.max_queue)
        self.running: list[Sequence] = []
        self._kv, self._prefix_cache, self._can_run = kv, prefix_cache, can_run
        self._policy = config.prefill_policy
        self._token_budget = config.prefill_token_budget
        self._last_was_prefill = False

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def push(self, seq: Sequence) -> int:
        """Queues a sequence; returns how many wait ahead of it."""
        return self.waiting.push(seq)

    def expired(self, now: float) -> list[Sequence]:
        """Running or waiting sequences whose deadline has passed."""
        return [s for s in self.running + self.waiting.waiting()
                if s.request.deadline is not None and now >= s.request.deadline]

    def schedule(self, now: float) -> StepPlan | None:
        """The next step, or None when there is nothing to run.

        `alternate` prefills newcomers in a step of their own and then owes the running rows a
        decode step; `eager` prefills whenever requests wait; `mixed` decodes every running row
        and prefills the newcomers in the same forward, so nobody waits for anybody's prompt.
        """
        newcomers: list[Sequence] = []
        decode_owed = self._policy == "alternate" and self._last_was_prefill and self.running
        if len(self.waiting) and not decode_owed:
            newcomers = self.waiting.admit(self._kv.slots - len(self.running), self._token_budget, self._can_run)
        if not newcomers and not self.running:
            return None
        decode = list(self.running) if self._policy == "mixed" or not newcomers else []
        plan = StepPlan(decode=decode, prefill=newcomers, start_slot=len(self.running))
        for seq in newcomers:
            seq.scheduled_at = now
            slot = len(self.running)
            self.running.append(seq)
            key = seq.prefix_key()
            if key is None:
                continue
            kv = self._prefix_cache.get(key)
            if kv is not None:
                plan.prefix_hits.append((slot, kv))
                seq.cached = seq.request.prefix_len
            else:
                plan.prefix_misses.append((slot, key, seq.request.prefix_len))
        self._last_was_prefill = bool(newcomers)
        return plan

    def remove(self, seq: Sequence) -> None:
        """Takes a finished sequence out: frees its KV slot (the last row moves into it) or its queue place."""
        if seq not in self.running:
            self.waiting.discard(seq)
            return
        slot, last = self.running.index(seq), len(self.running) - 1
        if slot != last:
            moved = self.running[last]
            self._kv.move(last, slot, moved.kv_len)
            self.running[slot] = moved
        self.running.pop()
