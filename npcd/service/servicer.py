"""The gRPC service: translates wire messages to engine requests and engine events back.

Nothing here generates text or decides scheduling; the servicer validates a
request (every field against the daemon's limits), picks the persona version,
renders the prompt, hands the request to the engine, and forwards events.

Two choices worth knowing:

* Requests arriving within `tick_window_s` of each other are submitted to the
  engine in one go (player-facing first), so a game tick's NPC lines join the
  same batch instead of trickling in one engine step apart.
* `deadline_ms` ends a request with Finished{reason: DEADLINE} carrying the text
  produced so far, and the RPC still ends with status OK: the game gets whatever
  the NPC managed to say, and a status code is kept for failures.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from npcd.engine.api import (
    UNREAD_EVENTS_MAX,
    Backend,
    BackendError,
    FieldDone,
    Finished,
    FinishReason,
    GenerationRequest,
    Started,
    TextDelta,
    UnknownAdapter,
)
from npcd.personas.prompt import PromptBuilder, PromptError
from npcd.service import logs
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.service.admitter import Admitter
from npcd.service.auth import TokenInterceptor, server_credentials
from npcd.service.config import DaemonConfig, Limits
from npcd.service.conversations import ConversationError, ConversationLimit, ConversationStore, Key
from npcd.service.conversion import (
    BACKEND_CODES,
    FINISH_REASONS,
    STATUSES,
    field_event,
    struct,
    structured_parts,
)
from npcd.service.dialogue import Dialogue, Remember
from npcd.service.metrics import Metrics
from npcd.service.registry import PersonaRegistry, PersonaState, PersonaUnavailable
from npcd.service.sentences import Piece, Segmenter
from npcd.service.structured import structured_output
from npcd.service.validation import (
    DEFAULT_SPEAKER,
    RequestError,
    check_ref,
    check_turns,
    internal,
    invalid,
    sampling_for,
    validate,
)
from npcd.service.wire import Undecodable, add_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Npcd"].full_name
CLIENT_KEY = "x-npcd-client"
CLIENT_NAME_CHARS = 128  # of a client's name; longer ones are cut (a name is not refused: it only groups calls)
ABANDONED_FINISH_S = 30.0  # how long a left line's Finished is waited for (a step; 30 s covers a stalled one)

@dataclass
class _Job:
    """One admitted request: what the server needs to translate and account its events."""

    client_id: str
    request: GenerationRequest
    persona: str
    npc_id: str
    segmentation: int = pb.SEGMENTATION_NONE  # Sentence events for it, by SayRequest.segmentation
    remember: Remember | None = None  # a conversation's line: what it appends when it finishes
    history_turns: int = 0            # earlier turns its prompt holds


def _sentence_events(rid: str, pieces: list[Piece]) -> list[pb.Event]:
    return [pb.Event(request_id=rid, sentence=pb.Sentence(index=p.index, text=p.text)) for p in pieces]


class NpcdServicer(npcd_pb2_grpc.NpcdServicer):
    def __init__(self, backend: Backend, registry: PersonaRegistry, limits: Limits, metrics: Metrics,
                 tick_window_s: float, log: Any = None, *, admin: bool = True, reload_interval_s: float = 0.0,
                 sentence_marks: str, clause_marks: str, conversations: ConversationStore | None = None):
        self._backend = backend
        self._marks = {"sentence_marks": sentence_marks, "clause_marks": clause_marks}  # DaemonConfig's
        self._registry = registry
        self._limits = limits
        self._metrics = metrics
        self._prompts = PromptBuilder(backend.tokenizer)
        self._admitter = Admitter(backend, tick_window_s)
        store = conversations or ConversationStore(
            None, max_turns=limits.max_conversation_turns, max_conversations=limits.max_conversations,
            max_text_chars=limits.max_line_chars, max_name_chars=limits.max_id_chars)
        self._log = log or logs.get()
        self._dialogue = Dialogue(store, self._prompts, backend.max_seq_len, self._submit, self._log)
        self._ids = itertools.count(1)
        self._running: set[str] = set()            # engine request ids in flight
        self._wakeups: set[Callable[[], None]] = set()  # sessions to nudge on shutdown
        self._pumps: set[asyncio.Task] = set()
        self._accepting = True
        self._closing = False
        self._admin, self._reload_interval_s = admin, reload_interval_s
        self._last_reload = -math.inf

    # --- admission ---------------------------------------------------------

    def _prepare(self, req: pb.SayRequest, engine_id: str, remaining_s: float | None, caller: str,
                 owner: str) -> _Job:
        """Validated request -> engine request; holds a persona lease that `_events` releases."""
        if not self._accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "npcd is shutting down; no new requests")
        validate(req, self._limits)
        try:
            persona = self._registry.acquire(req.persona)
        except PersonaUnavailable as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        try:
            structured, menu = structured_output(req, persona, self._limits, self._backend.check_schema)
            sampling = sampling_for(persona, req.sampling, self._limits)
            planned = self._dialogue.plan(req, persona, owner=owner, speaker=req.speaker or DEFAULT_SPEAKER,
                                          menu=menu, budget=self._dialogue.budget(sampling, structured is not None))
            prompt = planned.prompt
            deadline = None
            if req.deadline_ms:
                deadline = time.monotonic() + req.deadline_ms / 1000.0
            if remaining_s is not None:  # no point generating past the client's own deadline
                deadline = min(deadline or math.inf, time.monotonic() + remaining_s)
            request = GenerationRequest(
                request_id=engine_id, prompt_ids=prompt.ids, sampling=sampling,
                adapter=persona.id if persona.adapter_path is not None else None,
                prefix_len=prompt.prefix_len,
                priority=1 if req.priority == pb.PRIORITY_PLAYER else 0,
                deadline=deadline, structured=structured, client=caller, cache_key=planned.cache_key,
            )
        except PromptError as exc:  # its message names the field
            self._registry.release(persona.id)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except ConversationLimit as exc:
            self._registry.release(persona.id)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except RequestError:
            self._registry.release(persona.id)
            raise
        except BaseException:
            self._registry.release(persona.id)
            raise
        return _Job(client_id=req.request_id, request=request, persona=persona.id, npc_id=req.npc_id,
                    segmentation=req.segmentation, remember=planned.remember, history_turns=planned.history_turns)

    async def _admit(self, jobs: list[_Job]) -> list[AsyncIterator | RequestError]:
        try:
            results = await self._admitter.admit([job.request for job in jobs])
        except asyncio.CancelledError:  # the client left during the tick window; nothing was started
            for job in jobs:
                self._registry.release(job.persona)
            raise
        out: list[AsyncIterator | RequestError] = []
        for job, result in zip(jobs, results):
            if isinstance(result, BackendError):
                self._registry.release(job.persona)
                code = BACKEND_CODES.get(type(result), grpc.StatusCode.INTERNAL)
                if isinstance(result, UnknownAdapter):  # its file went away between lookup and submit
                    result = RequestError(code, f"persona {job.persona!r} is no longer loaded: {result}")
                else:
                    result = RequestError(code, str(result), getattr(result, "retry_after_ms", 0))
            else:
                self._running.add(job.request.request_id)
            out.append(result)
        return out

    def rejected(self, exc: RequestError, req: pb.SayRequest | _Job) -> RequestError:
        """Counts and logs a refusal (the one log line such a request gets)."""
        self._metrics.request_rejected(exc.code.name)
        request_id = req.client_id if isinstance(req, _Job) else req.request_id
        self._log.info("request refused", id=request_id, persona=req.persona, status=exc.code.name,
                       error=exc.message)
        return exc

    async def _events(self, job: _Job, stream: AsyncIterator) -> AsyncIterator[pb.Event]:
        """Engine events of one request as wire events; always releases what admission took."""
        rid = job.client_id
        last_delta = 0.0
        finished = False
        segmenter = None if job.segmentation == pb.SEGMENTATION_NONE else Segmenter(
            clauses=job.segmentation == pb.SEGMENTATION_CLAUSE, **self._marks)
        if hasattr(stream, "on_overflow"):
            stream.on_overflow = lambda: self._unread(job)
        try:
            async for event in stream:
                if isinstance(event, Started):
                    yield pb.Event(request_id=rid, started=pb.Started(queue_position=event.queue_position))
                elif isinstance(event, TextDelta):
                    now = time.monotonic()
                    if last_delta:
                        self._metrics.inter_token.observe(now - last_delta)
                    last_delta = now
                    yield pb.Event(request_id=rid, delta=pb.TextDelta(text=event.text))
                    for wire in _sentence_events(rid, segmenter.feed(event.text) if segmenter else []):
                        yield wire
                elif isinstance(event, FieldDone):
                    wire = field_event(rid, event.name, event.value)
                    if wire is not None:
                        yield wire
                elif isinstance(event, Finished):
                    finished = True
                    self._account(job, event)
                    self._remember(job, event)  # before Finished: the game's next line already sees this one
                    if segmenter is not None and event.reason is not FinishReason.ERROR:  # the rest, then Finished
                        for wire in _sentence_events(rid, segmenter.finish(event.text)):
                            yield wire
                    yield self._finished_event(job, event)
        finally:
            if not finished:  # the client went away: stop generating for it now, and still account the line
                self._backend.cancel(job.request.request_id)
                self._track(asyncio.get_running_loop().create_task(self._account_abandoned(job, stream)))
            self._running.discard(job.request.request_id)
            self._registry.release(job.persona)

    async def _account_abandoned(self, job: _Job, stream: AsyncIterator) -> None:
        """A line whose reader left (a cancelled or disconnected Say) ends like every other: one log line and
        one counted outcome, from the engine's Finished{CANCELLED}, which comes within a step of the cancel."""
        async def finished() -> Finished | None:
            async for event in stream:
                if isinstance(event, Finished):
                    return event
            return None
        try:  # wait_for, not asyncio.timeout: the package supports Python 3.10
            event = await asyncio.wait_for(finished(), ABANDONED_FINISH_S)
        except asyncio.TimeoutError:
            event = None
        if event is None:
            self._log.warning("no Finished for a line whose client left", id=job.client_id, persona=job.persona)
        else:
            self._account(job, event)
            self._remember(job, event)

    def _unread(self, job: _Job) -> None:
        """Its reader stopped reading: cancel the line (its Finished{CANCELLED} waits unread like the rest)."""
        self._metrics.unread.inc()
        self._log.warning("line cancelled: its reader stopped reading", id=job.client_id, persona=job.persona,
                          unread_events=UNREAD_EVENTS_MAX)
        self._backend.cancel(job.request.request_id)

    def _track(self, task: asyncio.Task) -> None:
        self._pumps.add(task)  # tasks that may outlive their RPC by one engine step
        task.add_done_callback(self._pumps.discard)

    def _account(self, job: _Job, event: Finished) -> None:
        self._metrics.request_finished(event.reason.value, event.completion_tokens, event.first_token_ms)
        logs.request_done(self._log, request_id=job.client_id, persona=job.persona, npc_id=job.npc_id,
                          finished=event)

    def _remember(self, job: _Job, event: Finished) -> None:
        if job.remember is not None:
            self._dialogue.finished(job.remember, event)

    async def _submit(self, request: GenerationRequest) -> AsyncIterator:
        """One request of the daemon's own (a conversation summary), through the same admission as lines."""
        [result] = await self._admitter.admit([request])
        if isinstance(result, BaseException):
            raise result
        return result

    @staticmethod
    def _finished_event(job: _Job, event: Finished) -> pb.Event:
        rid = job.client_id
        if event.reason is FinishReason.ERROR:
            code = grpc.StatusCode.INTERNAL
            return pb.Event(request_id=rid, error=pb.Error(code=code.value[0], status=code.name,
                                                           message=event.error or "generation failed"))
        finished = pb.Finished(
            reason=FINISH_REASONS[event.reason], text=event.text, prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens, json=event.json,
            cached_prompt_tokens=event.cached_prompt_tokens, history_turns=job.history_turns,
            timings=pb.Timings(queued_ms=event.queued_ms, first_token_ms=event.first_token_ms,
                               total_ms=event.total_ms))
        structured_parts(finished)
        return pb.Event(request_id=rid, finished=finished)

    # --- Say -----------------------------------------------------------------

    async def open_line(self, request: pb.SayRequest, who: str, remaining_s: float | None = None, *,
                        owner: str = "") -> AsyncIterator[pb.Event]:
        """One line on its own (Say, and the HTTP door): admitted now, or RequestError naming what is wrong.
        Returns the line's wire events; closing the iterator early cancels the line."""
        if not request.request_id:
            request.request_id = f"say-{next(self._ids)}"
        engine_id = f"say{next(self._ids)}:{request.request_id}"
        job = self._prepare(request, engine_id, remaining_s, who, owner)
        [result] = await self._admit([job])
        if isinstance(result, RequestError):
            raise result
        return self._events(job, result)

    async def Say(self, request: pb.SayRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        try:
            events = await self.open_line(request, caller(context), context.time_remaining(), owner=owner(context))
        except RequestError as exc:
            context.set_trailing_metadata(exc.trailers())
            await context.abort(exc.code, self.rejected(exc, request).message)
            return
        except Exception as exc:  # a bug in one request must not look like a transport error
            self._log.exception("request failed", id=request.request_id, persona=request.persona)
            error = self.rejected(internal(exc), request)
            await context.abort(error.code, error.message)
            return
        async for event in events:
            yield event

    # --- Session ---------------------------------------------------------------

    async def Session(self, request_iterator: AsyncIterator[pb.Tick],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        prefix = f"s{next(self._ids)}:"
        who, keeper = caller(context), owner(context)
        out: asyncio.Queue[pb.Event | None] = asyncio.Queue()   # None only wakes the loop up
        live: dict[str, asyncio.Task | None] = {}                 # client request id -> pump (None: admitting)
        reader_done = False

        async def pump(job: _Job, stream: AsyncIterator) -> None:
            stalled = False
            try:
                async for event in self._events(job, stream):
                    out.put_nowait(event)
                    if not stalled and out.qsize() > UNREAD_EVENTS_MAX:  # the session's reader stopped
                        stalled = True
                        self._unread(job)
            except Exception as exc:  # a bug in one request's stream must not end the others
                self._log.exception("request failed", id=job.client_id, persona=job.persona)
                out.put_nowait(internal(exc, "while streaming").event(job.client_id))
            finally:
                live.pop(job.client_id, None)
                out.put_nowait(None)

        async def on_tick(tick: pb.Tick) -> None:
            for cancel in tick.cancels:
                if cancel.request_id in live:
                    self._backend.cancel(prefix + cancel.request_id)
                # else: it already finished; a cancel racing the Finished is normal
            jobs: list[_Job] = []
            for req in tick.requests:
                try:
                    if not req.request_id:
                        raise invalid("request_id", "required in a Session (events are tagged with it)")
                    if req.request_id in live or any(j.client_id == req.request_id for j in jobs):
                        # not an Error: a client that treats Error as the end of that id would lose the line
                        refused = self.rejected(RequestError(grpc.StatusCode.ALREADY_EXISTS, (
                            f"request_id: {req.request_id!r} is already running in this session; this request "
                            f"was refused and that line goes on")), req)
                        out.put_nowait(pb.Event(request_id=req.request_id,
                                                duplicate=pb.Duplicate(message=refused.message)))
                        continue
                    jobs.append(self._prepare(req, prefix + req.request_id, None, who, keeper))
                except RequestError as exc:
                    out.put_nowait(self.rejected(exc, req).event(req.request_id))
                except Exception as exc:  # one broken request must not end the session
                    self._log.exception("request failed", id=req.request_id, persona=req.persona)
                    out.put_nowait(self.rejected(internal(exc), req).event(req.request_id))
            for job in jobs:  # reserve the ids while admission waits for the window
                live[job.client_id] = None
            for job, result in zip(jobs, await self._admit(jobs)):
                if isinstance(result, RequestError):
                    live.pop(job.client_id, None)
                    out.put_nowait(self.rejected(result, job).event(job.client_id))
                else:
                    task = asyncio.create_task(pump(job, result))
                    self._track(task)
                    live[job.client_id] = task

        async def read() -> None:
            nonlocal reader_done
            try:
                async for tick in request_iterator:
                    if isinstance(tick, Undecodable):  # one bad frame is refused; the session goes on
                        self._metrics.request_rejected(grpc.StatusCode.INVALID_ARGUMENT.name)
                        self._log.info("tick refused", error=tick.message)
                        out.put_nowait(RequestError(grpc.StatusCode.INVALID_ARGUMENT, tick.message).event(""))
                        continue
                    await on_tick(tick)
            finally:
                reader_done = True
                out.put_nowait(None)

        wake = lambda: out.put_nowait(None)  # noqa: E731
        self._wakeups.add(wake)
        reader = asyncio.create_task(read())
        try:
            while True:
                if out.empty() and not live and (reader_done or self._closing):
                    break
                event = await out.get()
                if event is not None:
                    yield event
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            self._wakeups.discard(wake)
            reader.cancel()
            for client_id, task in list(live.items()):
                if task is not None:  # its pump gets Finished{CANCELLED} within a step and releases everything
                    self._backend.cancel(prefix + client_id)

    # --- personas ----------------------------------------------------------------

    def _persona_pb(self, state: PersonaState) -> pb.Persona:
        msg = pb.Persona(id=state.id, status=STATUSES[state.status], error=self._unrooted(state.error or ""),
                         source=self._shown(state.source))
        persona = state.persona
        if persona is None:
            return msg
        msg.display_name, msg.description = persona.display_name, persona.description
        msg.metadata.CopyFrom(struct(persona.metadata))
        if persona.adapter_path is not None:
            info = self._backend.adapters().get(persona.id)
            msg.adapter.path = self._shown(persona.adapter_path)
            if info is not None:
                msg.adapter.rank, msg.adapter.alpha = info.rank, info.alpha
                msg.adapter.target_modules.extend(info.target_modules)
                msg.adapter.resident = info.resident
        return msg

    def _shown(self, path: Path) -> str:
        """A path as callers see it: relative to the personas directory (no machine layout leaves the daemon)."""
        return os.path.relpath(path, self._registry.directory.resolve())

    def _unrooted(self, text: str) -> str:
        """An error message with the personas directory's absolute prefix taken off its file names."""
        return text.replace(f"{self._registry.directory.resolve()}{os.sep}", "")

    async def ListPersonas(self, request: pb.ListPersonasRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListPersonasResponse:
        return pb.ListPersonasResponse(personas=[self._persona_pb(s) for s in self._registry.states()])

    async def GetPersona(self, request: pb.GetPersonaRequest, context: grpc.aio.ServicerContext) -> pb.Persona:
        if len(request.id) > self._limits.max_id_chars:  # never echoed: it could exceed gRPC's metadata limit
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"id: at most {self._limits.max_id_chars} characters, got {len(request.id)}")
        state = self._registry.get(request.id)
        if state is None:
            known = ", ".join(s.id for s in self._registry.states()) or "none"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown persona {request.id!r}; known personas: {known}")
        return self._persona_pb(state)

    async def ReloadPersonas(self, request: pb.ReloadPersonasRequest,
                             context: grpc.aio.ServicerContext) -> pb.ReloadPersonasResponse:
        if not self._admin:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "ReloadPersonas is switched off on this daemon (admin: false); the personas "
                                "directory is still watched")
        wait = self._last_reload + self._reload_interval_s - time.monotonic()
        if wait > 0:  # a reload re-reads every file: callers looping on it slowed player lines 4-8x
            retry = int(wait * 1000) + 1
            context.set_trailing_metadata((("retry-after-ms", str(retry)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"ReloadPersonas at most once per {self._reload_interval_s:g} s; "
                                f"try again in {retry} ms")
        self._last_reload = time.monotonic()
        errors = await asyncio.to_thread(self._registry.reload)
        return pb.ReloadPersonasResponse(personas=[self._persona_pb(s) for s in self._registry.states()],
                                         errors=[self._unrooted(e) for e in errors])

    # --- conversations -------------------------------------------------------------

    def _key(self, ref: pb.ConversationRef, context: grpc.aio.ServicerContext, *, known: bool = False) -> Key:
        check_ref(ref, self._limits)
        if known and self._registry.get(ref.persona) is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"persona: unknown persona {ref.persona!r}")
        return Key(owner(context), ref.conversation, ref.persona)

    def _conversation_pb(self, key: Key) -> pb.Conversation:
        conv = self._dialogue.store.get(key)
        msg = pb.Conversation(conversation=key.conversation, persona=key.persona)
        if conv is not None:
            msg.turns.extend(pb.ConversationTurn(speaker=t.speaker, text=t.text, npc=t.npc) for t in conv.turns)
            msg.summary = conv.summary
            msg.summarized_turns = sum(1 for t in conv.turns if t.seq < conv.summarized)
        return msg

    async def _conversation_call(self, context: grpc.aio.ServicerContext, work: Callable[[], Any]) -> Any:
        """Runs one conversation RPC: a refusal is its status, naming the field; the store stays as it was."""
        try:
            return work()
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        except ConversationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ConversationLimit as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def GetConversation(self, request: pb.ConversationRef, context: grpc.aio.ServicerContext) -> pb.Conversation:
        return await self._conversation_call(context, lambda: self._conversation_pb(self._key(request, context)))

    async def ListConversations(self, request: pb.ListConversationsRequest,
                                context: grpc.aio.ServicerContext) -> pb.ListConversationsResponse:
        def work() -> pb.ListConversationsResponse:
            if len(request.persona) > self._limits.max_id_chars:
                raise invalid("persona", f"at most {self._limits.max_id_chars} characters, got {len(request.persona)}")
            return pb.ListConversationsResponse(conversations=[
                pb.ConversationInfo(conversation=k.conversation, persona=k.persona, turns=n, updated_unix_s=at)
                for k, n, at in self._dialogue.store.list(owner(context), request.persona)])
        return await self._conversation_call(context, work)

    async def AddTurns(self, request: pb.AddTurnsRequest, context: grpc.aio.ServicerContext) -> pb.Conversation:
        def work() -> pb.Conversation:
            key = self._key(request.ref, context, known=True)
            turns = check_turns(request.turns, "turns", self._limits)
            self._dialogue.store.append(self._dialogue.store.get_or_new(key), turns)
            return self._conversation_pb(key)
        return await self._conversation_call(context, work)

    async def SetConversation(self, request: pb.Conversation, context: grpc.aio.ServicerContext) -> pb.Conversation:
        def work() -> pb.Conversation:
            key = self._key(pb.ConversationRef(conversation=request.conversation, persona=request.persona), context,
                            known=True)
            turns = check_turns(request.turns, "turns", self._limits)
            if len(request.summary) > self._limits.max_line_chars:
                raise invalid("summary", f"at most {self._limits.max_line_chars} characters, got {len(request.summary)}")
            if self._dialogue.store.get(key) is None:
                self._dialogue.store.get_or_new(key)  # a new conversation counts against the client's limit
            self._dialogue.store.replace(key, turns, request.summary)
            return self._conversation_pb(key)
        return await self._conversation_call(context, work)

    async def ResetConversation(self, request: pb.ConversationRef,
                                context: grpc.aio.ServicerContext) -> pb.Conversation:
        def work() -> pb.Conversation:
            key = self._key(request, context)
            self._dialogue.store.delete(key)
            return self._conversation_pb(key)
        return await self._conversation_call(context, work)

    async def ExportConversations(self, request: pb.ExportConversationsRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ConversationsBlob:
        def work() -> pb.ConversationsBlob:
            data, count = self._dialogue.store.export(owner(context), request.persona)
            return pb.ConversationsBlob(data=data, conversations=count)
        return await self._conversation_call(context, work)

    async def ImportConversations(self, request: pb.ImportConversationsRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ImportConversationsResponse:
        def work() -> pb.ImportConversationsResponse:
            count = self._dialogue.store.import_(owner(context), request.data, replace=request.replace)
            return pb.ImportConversationsResponse(conversations=count)
        return await self._conversation_call(context, work)

    # --- shutdown ------------------------------------------------------------------

    async def close(self) -> None:
        """After the server stopped: summaries in flight are dropped, the conversation store is closed."""
        await self._dialogue.close()

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let running requests finish for up to grace_s, then cancel them.

        Cancelled requests still send their Finished{CANCELLED} event, and sessions end
        their streams with status OK once nothing of theirs is running.
        """
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for engine_id in list(self._running):
            self._backend.cancel(engine_id)
        deadline = time.monotonic() + 5.0
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._closing = True
        for wake in list(self._wakeups):
            wake()


def identity(named: str, connection: str) -> tuple[str, str]:
    """(who a call comes from, for fair shares; whose conversations it reads and writes), from the client's name
    (`x-npcd-client`, or the HTTP door's `user`) and its connection. A name covers one game with several
    connections, or several games behind one proxy; without one each connection is its own client for fair
    shares, and conversations are the one shared set (an address changes with every reconnect, and conversations
    outlive connections)."""
    named = named[:CLIENT_NAME_CHARS]
    return (f"client:{named}" if named else connection), named


def _named(context: grpc.aio.ServicerContext) -> str:
    return dict(context.invocation_metadata() or ()).get(CLIENT_KEY, "")


def owner(context: grpc.aio.ServicerContext) -> str:
    return identity(_named(context), context.peer())[1]


def caller(context: grpc.aio.ServicerContext) -> str:
    return identity(_named(context), context.peer())[0]


async def start_server(servicer: NpcdServicer,
                       config: DaemonConfig) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A started grpc.aio server with the service, health checking and (unless switched off) reflection, on
    TLS and behind the token when the config says so; returns the bound port."""
    server = grpc.aio.server(interceptors=[TokenInterceptor(config.token)] if config.token else None)
    add_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = server_credentials(config)
    listen = config.listen
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await set_serving(health_servicer, True)
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
