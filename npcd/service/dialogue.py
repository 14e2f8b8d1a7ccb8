"""A line's prompt within the budget, and what a conversation remembers of it.

Every prompt is fitted to `max_seq_len` less the reply's room (npcd.personas.prompt.Budget): never a
refusal for length while the new line alone fits. A request with `conversation` takes its earlier turns
from the daemon's store (npcd.service.conversations); its line and the NPC's reply are appended when it
finishes.

Moving a conversation's window (dropping its oldest exchanges) changes its prompt's beginning, so no
earlier KV applies and the next line would wait for a full prefill (measured: 4-5 s for 600 tokens on a
loaded 2-core CPU, against ~0.3 s for a line that reuses its conversation). So the window moves ahead of
time: once a conversation's next prompt would pass the budget's `move_at`, its new beginning is computed
in the background (a one-token line at the engine's BACKGROUND_PRIORITY) while lines go on in the old
window, and the window switches when that KV is ready. Prefix-cache entries are keyed by window and
summary, so a line planned in the old window can never overwrite the new window's entry.

A persona with `memory.when_full: summarize` folds the turns that left into its summary, written by the
base model with the persona's adapter, in the background; it applies once the KV of the beginning it
opens is computed the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from npcd.engine.api import (BACKGROUND_PRIORITY, STRUCTURE_TOKENS, BackendError, Finished, FinishReason,
                            GenerationRequest, SamplingParams)
from npcd.personas.loader import Persona
from npcd.personas.prompt import Budget, Prompt, PromptBuilder
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.conversations import Conversation, ConversationStore, Key, Turn

BACKGROUND_CLIENT = "npcd:background"  # the fair-share client of the daemon's own lines: never more than its share
ANSWERED = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.DEADLINE, FinishReason.PREEMPTED)

# Submits a request, returns its engine event stream (raises BackendError when refused).
Submit = Callable[[GenerationRequest], Awaitable[Any]]


def cache_key(key: Key, window: int, summary: str) -> str:
    """The engine's prefix-cache key of a conversation's prompts with this window and summary: their beginning
    is the same, so their KV is interchangeable, and another window's or summary's never is."""
    return f"{key.cache_key}\x00{window}\x00{zlib.crc32(summary.encode()):08x}"


@dataclass
class Remember:
    """What a conversation line appends when it finishes."""

    key: Key
    heard: list[Turn]       # the request's history: lines said since, before this one
    speaker: str
    line: str
    shown: str              # the user turn as the model saw it
    persona: Persona
    budget: Budget
    user_tokens: int        # the new user turn's tokens: the next prompt's growth is about the same


@dataclass
class Planned:
    prompt: Prompt
    history_turns: int            # earlier turns the prompt holds (stored and sent)
    remember: Remember | None = None
    cache_key: str = ""


@dataclass
class Dialogue:
    store: ConversationStore
    prompts: PromptBuilder
    max_seq_len: int
    submit: Submit
    log: Any
    _summarizing: set[Key] = field(default_factory=set)
    _warming: set[Key] = field(default_factory=set)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def budget(self, sampling: SamplingParams, structured: bool) -> Budget:
        return Budget.for_reply(self.max_seq_len, sampling.max_tokens + (STRUCTURE_TOKENS if structured else 0))

    def plan(self, req: pb.SayRequest, persona: Persona, *, owner: str, speaker: str, menu: str,
             budget: Budget) -> Planned:
        """The prompt of a validated request (PromptTooLong when its line alone cannot fit)."""
        fields = dict(speaker=speaker, line=req.line, context=dict(req.context), npc_id=req.npc_id, menu=menu,
                      budget=budget)
        sent = [{"speaker": t.speaker, "text": t.text} for t in req.history]
        if not req.conversation:
            prompt = self.prompts.build(persona, history=sent, **fields)
            return Planned(prompt, prompt.history_kept)
        key = Key(owner, req.conversation, persona.id)
        conv = self.store.get_or_new(key)
        exchanges, starts, pending = conv.prompt_parts()
        history = [{"speaker": t.speaker, "text": t.text} for t in pending] + sent
        prompt = self.prompts.build(persona, history=history, earlier=exchanges, summary=conv.summary, **fields)
        summary = conv.summary
        end = pending[0].seq if pending else conv.next_seq  # stored turns before the pending ones are exchanges
        if prompt.first_exchange < len(exchanges):
            window = starts[prompt.first_exchange]
        else:
            dropped = len(history) - prompt.history_kept
            window = pending[dropped].seq if dropped < len(pending) else conv.next_seq
        held = sum(1 for t in conv.turns if window <= t.seq < end)
        if window > conv.window:  # it did not fit even so (a background move was too late, or was refused)
            self._move_window(conv, window, persona)
        remember = Remember(key, [Turn(t.speaker, t.text) for t in req.history], speaker, req.line,
                            prompt.user_turn, persona, budget, prompt.user_tokens)
        return Planned(prompt, held + prompt.history_kept, remember, cache_key(key, window, summary))

    def finished(self, remember: Remember, event: Finished) -> None:
        """Appends the line's turns: what was heard, the line, and the NPC's reply when it gave one (a
        cancelled or failed line keeps the player's words, which were said, but no reply)."""
        answered = event.reason in ANSWERED and bool(event.text.strip())
        turns = [*remember.heard, Turn(remember.speaker, remember.line, shown=remember.shown if answered else "")]
        if answered:
            turns.append(Turn(remember.persona.display_name, event.text, npc=True))
        try:
            conv = self.store.get_or_new(remember.key)  # reset meanwhile: the line starts a new one
            self.store.append(conv, turns)
        except Exception as exc:  # noqa: BLE001 - the line was delivered; a store failure must not end the stream
            self.log.error("conversation not saved", conversation=remember.key.conversation,
                           persona=remember.key.persona, error=repr(exc))
            return
        if not answered or conv.key in self._warming:
            return
        # the next prompt, in the window as it is now: its exchanges, then a new user turn as long as this one's
        exchanges, starts, _ = conv.prompt_parts()
        persona, budget = remember.persona, remember.budget
        if len(self.prompts.beginning(persona, exchanges, conv.summary)) + remember.user_tokens > budget.move_at:
            start = self.prompts.window_start(persona, exchanges, conv.summary, budget.low_water)
            if 0 < start < len(exchanges):
                self._warm(conv, persona, starts[start], conv.summary, self._switch_window)

    def _switch_window(self, conv: Conversation, persona: Persona, window: int, summary: str) -> None:
        if window > conv.window:  # not already moved past it by a line that did not fit
            self._move_window(conv, window, persona)

    # -- summaries --------------------------------------------------------------

    def _move_window(self, conv: Conversation, window: int, persona: Persona) -> None:
        self.store.set_window(conv, window)
        if persona.memory.when_full == "summarize" and conv.key not in self._summarizing:
            self._summarizing.add(conv.key)
            self._spawn(self._summarize(conv.key, persona, window))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warm(self, conv: Conversation, persona: Persona, window: int, summary: str,
              then: Callable[[Conversation, Persona, int, str], None]) -> None:
        """Computes, at background priority, the KV of the beginning a conversation's prompts will have with this
        window and summary (a one-token line under that cache key), then calls `then` (on the event loop); the
        conversation's lines meanwhile go on as they were."""
        exchanges = Conversation(conv.key, conv.turns, window=window).prompt_parts()[0]
        ids = self.prompts.beginning(persona, exchanges, summary)
        system_len = len(self.prompts.system_turn(persona)[0])
        if len(ids) <= system_len:
            then(conv, persona, window, summary)
            return
        request = GenerationRequest(request_id=f"warm{next(self._ids)}", prompt_ids=ids,
                                    sampling=SamplingParams(temperature=0.0, max_tokens=1),
                                    adapter=persona.id if persona.adapter_path else None, prefix_len=system_len,
                                    priority=BACKGROUND_PRIORITY, client=BACKGROUND_CLIENT,
                                    cache_key=cache_key(conv.key, window, summary))
        self._warming.add(conv.key)

        async def warm() -> None:
            try:
                event = await self._run(request, "conversation beginning", conv.key)
                current = self.store.get(conv.key)
                if event is not None and current is not None:
                    then(current, persona, window, summary)
            finally:
                self._warming.discard(conv.key)
        self._spawn(warm())

    async def _run(self, request: GenerationRequest, what: str, key: Key) -> Finished | None:
        """A line of the daemon's own, to its end; None when it was refused (a full queue: best effort) or did not
        run whole (shed for a player line, or failed): only a whole prompt leaves its KV behind."""
        try:
            stream = await self.submit(request)
        except BackendError as exc:
            self.log.warning(f"{what} skipped", conversation=key.conversation, error=str(exc))
            return None
        async for event in stream:
            if isinstance(event, Finished):
                if event.reason not in (FinishReason.STOP, FinishReason.LENGTH):
                    self.log.warning(f"{what} ended early", conversation=key.conversation,
                                     reason=event.reason.name, error=event.error)
                    return None
                self.log.debug(f"{what} computed", conversation=key.conversation, persona=key.persona,
                               prompt_tokens=event.prompt_tokens, ms=round(event.total_ms))
                return event
        return None

    async def _summarize(self, key: Key, persona: Persona, upto: int) -> None:
        try:
            conv = self.store.get(key)
            if conv is None:
                return
            turns = [{"speaker": t.speaker, "text": t.text} for t in conv.turns if conv.summarized <= t.seq < upto]
            if conv.summary:
                turns.insert(0, {"speaker": "Earlier", "text": conv.summary})
            if not turns:
                return
            words = persona.memory.summary_tokens * 2 // 3
            sampling = persona.sampling_params(overrides={"temperature": 0.0,
                                                          "max_tokens": persona.memory.summary_tokens})
            prompt = self.prompts.build(
                persona, speaker="Narrator", history=turns, budget=self.budget(sampling, False),
                line=f"In at most {words} words and in your own voice, sum up what was said above, so that you "
                     f"remember it: names, promises, prices and facts.")
            request = GenerationRequest(request_id=f"summary{next(self._ids)}", prompt_ids=prompt.ids,
                                        sampling=sampling, adapter=persona.id if persona.adapter_path else None,
                                        prefix_len=prompt.prefix_len, priority=BACKGROUND_PRIORITY,
                                        client=BACKGROUND_CLIENT)
            event = await self._run(request, "conversation summary", key)  # refused: the turns stay dropped
            if event is not None and event.text.strip():
                conv = self.store.get(key)
                if conv is not None:
                    self.log.info("conversation summarised", conversation=key.conversation, persona=key.persona,
                                  turns=len(turns), summary_tokens=event.completion_tokens)

                    def apply(conv: Conversation, persona: Persona, window: int, summary: str) -> None:
                        self.store.set_window(conv, conv.window, summary=summary, summarized=upto)
                    # the summary opens the prompt: it applies once the KV of that beginning is computed
                    self._warm(conv, persona, conv.window, event.text.strip(), apply)
        except Exception as exc:  # noqa: BLE001 - a summary is best effort; lines go on without it
            self.log.error("conversation summary failed", conversation=key.conversation, error=repr(exc))
        finally:
            self._summarizing.discard(key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()
