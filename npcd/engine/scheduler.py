"""Who runs next: the waiting queue, the running batch's KV slots, and what each step holds.

The scheduler makes every decision of a step and touches no tensor but to
move a finished row's keys: which waiting requests are admitted (priority
first, then arrival; a KV slot free, the adapter resident, room left in the
step's prefill token budget), which running rows decode, which KV slot each
row owns, which part of each prompt is prefilled in this step, and which
persona prefixes are served from the prefix cache. The runner executes the
plan; the postprocessor turns logits into text.

Chunked prefill: a step computes at most `prefill_token_budget` prompt tokens,
so a long prompt (a 900-token history) is prefilled over several steps while
the running lines keep decoding, and no step waits on more than one budget.
`running` holds the rows that decode first and the rows still prefilling after
them, so each kind is a contiguous range of KV slots; the budget goes to the
prefilling rows in slot order, then to newcomers, so the rows that get a chunk
are contiguous too, and those that finish their prompt join the decoding range.

Player-facing lines go before ambient barks; within a priority, first come
first served. And they never wait for a slot: when every slot is taken and a
player line waits, the ambient line with the least text so far is shed
(Finished{PREEMPTED}, its text so far), so a flood of barks cannot hold the
player's line back for a whole bark's length. The queue keeps places for
player lines too (`player_queue_reserve`): ambient requests see a shorter one.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
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
        """Pops, in priority order, the items that start in this step; the others keep their place.

        Items are taken while the budget has room: the last one may get only the first chunk of its
        prompt (prefill packs prompts, so a step costs the sum of their tokens, not rows x longest)."""
        chosen: list[W] = []
        kept: list[tuple[int, int, W]] = []
        tokens = 0
        while self._heap and len(chosen) < free_slots and tokens < token_budget:
            entry = heapq.heappop(self._heap)
            item = entry[2]
            if item.done:
                continue
            if not can_run(item):
                kept.append(entry)
                continue
            chosen.append(item)
            tokens += min(item.prefill_tokens, token_budget - tokens)
        for entry in kept:
            heapq.heappush(self._heap, entry)
        self._live -= len(chosen)
        return chosen


AMBIENT_SHARE_DIVISOR = 8  # while a player line runs, ambient prompts get 1/8 of the step's prompt budget


@dataclass
class StepPlan:
    """What one forward pass computes. Rows keep this order in the logits: decode, then prefill."""

    decode: list[Sequence]                                   # decoding rows, KV slots 0..len-1, one token each
    prefill: list[Sequence]                                  # rows prefilling a chunk, in the KV slots after
    start_slot: int                                          # KV slot of the first prefill row
    chunks: list[tuple[int, int]] = field(default_factory=list)  # per prefill row: prompt[start:end] this step
    prefix_hits: list[tuple[int, PrefixKV]] = field(default_factory=list)   # (slot, KV) to copy in first
    prefix_misses: list[tuple[int, tuple]] = field(default_factory=list)  # (slot, system key) to keep

    @property
    def rows(self) -> list[Sequence]:
        return self.decode + self.prefill

    @property
    def sampled(self) -> list[int]:
        """Indices into `rows` that get a token: decode rows and prefill rows whose prompt ends in this step."""
        done = [len(self.decode) + i for i, (seq, (_, end)) in enumerate(zip(self.prefill, self.chunks))
                if end == len(seq.prompt)]
        return list(range(len(self.decode))) + done


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

    def queue_hog(self, client: str) -> Sequence | None:
        """When the queue is full: the newest waiting line of the client holding the most places, if that
        client holds more than its share (the queue over the clients waiting, `client` counted) and is not
        `client`; it gives its place up. So a client that filled the queue alone, or never reads, cannot
        keep another client out, while a lone client may still use the whole queue."""
        waiting = self.waiting.waiting()
        held = Counter(w.client for w in waiting)
        if not held:
            return None
        hog, count = held.most_common(1)[0]
        share = self.waiting.max_queue / len(set(held) | {client})
        if hog == client or count <= share:
            return None
        return max((w for w in waiting if w.client == hog), key=lambda w: w.arrival)

    def fair_share(self) -> int:
        """Batch slots each client may hold while another client waits: the slots over the clients present."""
        clients = {s.client for s in self.running} | {w.client for w in self.waiting.waiting()}
        return -(-self._kv.slots // max(1, len(clients)))

    def preemptions(self) -> list[Sequence]:
        """Running lines to shed now, one per waiting line that finds no free slot and outranks a running one:
        by priority (a player line over an ambient one), or by fairness (a client under its share of the slots
        over one above it, at equal priority). The victim is the lowest priority, then the fewest tokens so far
        (the least lost), then the latest started."""
        free = self._kv.slots - len(self.running)
        if len(self.waiting) <= free:  # every step asks: answer from the counts before building any list
            return []
        waiting = sorted(self.waiting.waiting(), key=lambda w: (-w.priority, w.arrival))  # the order admit takes
        share = self.fair_share()
        held = Counter(s.client for s in self.running)
        candidates = sorted(self.running, key=lambda s: (s.priority, len(s.generated), -s.scheduled_at))
        victims: list[Sequence] = []
        for w in waiting[free:]:
            for c in candidates:
                unfair = (c.priority == w.priority and c.client != w.client and held[c.client] > share
                          and held[w.client] < share)
                if c.priority < w.priority or unfair:
                    victims.append(c)
                    candidates.remove(c)
                    held[c.client] -= 1
                    held[w.client] += 1
                    break
        return victims

    def _fair(self, can_run: Callable[[Sequence], bool]) -> Callable[[Sequence], bool]:
        """`can_run`, and no client past its fair share of the slots while another client's line waits."""
        share, held = self.fair_share(), Counter(s.client for s in self.running)
        waiting_clients = Counter(w.client for w in self.waiting.waiting())

        def fair(seq: Sequence) -> bool:
            others_wait = sum(waiting_clients.values()) > waiting_clients[seq.client]
            if held[seq.client] >= share and others_wait:
                return False
            if not can_run(seq):
                return False
            held[seq.client] += 1
            waiting_clients[seq.client] -= 1
            return True
        return fair

    def expired(self, now: float) -> list[Sequence]:
        """Running or waiting sequences whose deadline has passed."""
        return [s for s in self.running + self.waiting.waiting()
                if s.request.deadline is not None and now >= s.request.deadline]

    @property
    def decoding(self) -> int:
        """Running rows that have their whole prompt in the cache (slots 0..decoding-1)."""
        return sum(1 for seq in self.running if seq.prefilled)

    def schedule(self, now: float) -> StepPlan | None:
        """The next step, or None when there is nothing to run.

        `alternate` prefills in a step of its own and then owes the running rows a decode step;
        `eager` prefills whenever there is prompt work; `mixed` decodes every decoding row and
        prefills in the same forward, so nobody waits for anybody's prompt.
        """
        decoding = self.decoding
        prefilling = self.running[decoding:]
        decode_owed = self._policy == "alternate" and self._last_was_prefill and decoding > 0
        budget = 0 if decode_owed else self._token_budget
        newcomers: list[Sequence] = []
        # the budget left after the rows already prefilling, but a player line waits for no ambient one's prompt
        # (a conversation's background window, a long bark): those rows give way below
        top = max((w.priority for w in self.waiting.waiting()), default=0) if prefilling and len(self.waiting) else 0
        left = budget - sum(len(seq.prompt) - seq.kv_len for seq in prefilling if seq.priority >= top)
        if len(self.waiting) and left > 0:
            newcomers = self.waiting.admit(self._kv.slots - len(self.running), left, self._fair(self._can_run))
        plan = StepPlan(decode=[], prefill=[], start_slot=decoding)
        for seq in newcomers:
            seq.scheduled_at = now
            self.running.append(seq)
        self._prefill_by_priority(decoding)
        for seq in newcomers:
            slot = self.running.index(seq)
            keys = seq.cache_keys()
            if not keys:
                continue
            reused, kv = self._prefix_cache.longest(keys, seq.prompt)
            if kv is not None:
                plan.prefix_hits.append((slot, kv))
                seq.cached = seq.kv_len = reused
            system = seq.system_key()
            if system is not None and system not in self._prefix_cache:
                seq.pending_prefix = system  # kept once its tokens are in the slot, for the persona's next lines
        # While a player line runs, ambient prompts get only a small share of each step: a step's time grows
        # with its prompt tokens, and the player's first token and every next one wait for the step. Measured
        # on a 2-core AVX2 CPU: a player line beside a 430-token background prompt waited 1.2-1.5 s for its
        # first token with the whole budget shared, against ~0.3 s alone.
        # The daemon's own rows (BACKGROUND_PRIORITY) always get at most that share, and nothing in a step that
        # computes a player line's prompt: that step is the player's time to first token.
        player = any(s.priority > 0 for s in self.running)
        share = max(1, budget // AMBIENT_SHARE_DIVISOR)
        ambient = share if player else budget
        player_prefill = False
        for slot in range(decoding, len(self.running)):
            seq = self.running[slot]  # in priority order (_prefill_by_priority): player, ambient, background
            cap = budget if seq.priority > 0 else ambient
            if seq.priority < 0:
                cap = 0 if player_prefill else min(cap, share)
            take = min(len(seq.prompt) - seq.kv_len, budget, cap)
            if take <= 0:
                break  # budget spent: this row and the ones after it wait for the next step
            budget -= take
            if seq.priority <= 0:
                ambient -= take
            player_prefill |= seq.priority > 0
            plan.prefill.append(seq)
            plan.chunks.append((seq.kv_len, seq.kv_len + take))
            if seq.pending_prefix is not None and seq.kv_len + take >= seq.request.prefix_len:
                plan.prefix_misses.append((slot, seq.pending_prefix))
                seq.pending_prefix = None
        if self._policy == "mixed" or not plan.prefill:
            plan.decode = self.running[:decoding]
        if not plan.decode and not plan.prefill:
            return None
        self._last_was_prefill = bool(plan.prefill)
        return plan

    def _prefill_by_priority(self, decoding: int) -> None:
        """Orders the prefilling rows (the slots after the decoding ones) player lines first, so the step's
        prompt budget goes to them first; a row that changes slot takes its computed KV with it."""
        segment = self.running[decoding:]
        order = sorted(segment, key=lambda s: -s.priority)  # stable: arrival order within a priority
        if order == segment:
            return
        saved = {id(s): self._kv.read(decoding + i, s.kv_len) for i, s in enumerate(segment) if s.kv_len}
        for i, seq in enumerate(order):
            self.running[decoding + i] = seq
            if id(seq) in saved:
                self._kv.write(decoding + i, saved[id(seq)])

    def remove(self, seq: Sequence) -> None:
        """Takes a finished sequence out: frees its KV slot or its queue place.

        No holes: the last row of its range (decoding or prefilling) moves into its slot (one copy of
        that row's keys), and a decoding row's freed range end is filled by the last prefilling row."""
        if seq not in self.running:
            self.waiting.discard(seq)
            return
        slot = self.running.index(seq)
        if seq.prefilled:
            last_decoding = self.decoding - 1
            self._move(last_decoding, slot)
            slot = last_decoding
        self._move(len(self.running) - 1, slot)
        self.running.pop()

    def _move(self, src: int, dst: int) -> None:
        if src != dst:
            moved = self.running[src]
            self._kv.move(src, dst, moved.kv_len)
            self.running[dst] = moved
