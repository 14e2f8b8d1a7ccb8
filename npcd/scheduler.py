"""Who runs next: a bounded, priority-ordered waiting queue.

Player-facing lines go before ambient barks; within a priority, first come
first served. Admission is decided at step boundaries: a waiting request joins
the running batch when a KV slot is free, its adapter can be made resident,
and the step's prefill token budget allows.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Generic, Protocol, TypeVar


class Waiting(Protocol):
    priority: int
    done: bool
    prefill_tokens: int


W = TypeVar("W", bound=Waiting)


class Scheduler(Generic[W]):
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
