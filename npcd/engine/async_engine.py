"""An Engine on its own thread, behind the `npcd.engine.api.Backend` interface.

The daemon's asyncio loop never waits for a forward pass: requests go into the
engine's inbox, and the events a step produces are handed to each asyncio loop
in one batch (one call_soon_threadsafe per loop per step), not one wake-up per
token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import Future
from typing import AsyncIterator, Callable

import structlog
import torch

from npcd.engine.api import (
    UNREAD_EVENTS_MAX,
    AdapterInfo,
    BackendError,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
)
from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine
from npcd.engine.sequence import Sink


class RequestStream:
    """Async iterator over one request's events; delivered on the submitting loop.

    Events wait here until read; past UNREAD_EVENTS_MAX unread, `on_overflow` (set by the reader's owner) is
    called once, so a client that stopped reading cannot make the engine generate for nobody."""

    def __init__(self, engine: "AsyncEngine", request_id: str):
        self._engine, self.request_id = engine, request_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False
        self.on_overflow: Callable[[], None] | None = None

    def put(self, event: Event) -> None:
        self._queue.put_nowait(event)
        if self.on_overflow is not None and self._queue.qsize() > UNREAD_EVENTS_MAX:
            overflow, self.on_overflow = self.on_overflow, None
            overflow()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, Finished):
            self._done = True
        return event

    async def aclose(self) -> None:
        """Stopping early (e.g. the client went away) cancels the request."""
        if not self._done:
            self._done = True
            self._engine.cancel(self.request_id)


class AsyncEngine:
    """An Engine on its own thread. A step that raises fails the running lines (the queued ones
    go on), logs its traceback once per distinct error, and marks the backend unhealthy until a
    step succeeds again.

    The Engine is built on the thread that steps it, and every command reaches it through its
    inbox, so all of its tensor work runs on one thread. Why: OpenMP keeps a thread team per
    thread that starts parallel work, and once another thread had one (the thread that loaded the
    weights and ran the warm-up), every step on the engine thread ran at half speed on the 2-core
    machine (a batch-1 decode step 36-39 ms instead of 16-20 ms, measured)."""

    def __init__(self, config: EngineConfig):
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        self._log = structlog.get_logger("npcd.engine")
        self._failures = 0                 # steps that raised, since start
        self._last_error = ""              # repr of the last step's exception; "" after a good step
        built: Future = Future()
        self._thread: threading.Thread | None = threading.Thread(target=self._run, args=(config, built),
                                                                 name="npcd-engine", daemon=True)
        self._thread.start()
        self.engine: Engine = built.result()  # a failed load raises here, in the caller
        self.tokenizer = self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def start(self) -> None:
        """Starts stepping; before it, the engine thread only runs inbox commands (adapter installs)."""
        self._started.set()
        self._wake.set()

    def _run(self, config: EngineConfig, built: Future) -> None:
        try:
            engine = Engine(config)
        except BaseException as exc:  # handed to the constructor's caller
            built.set_exception(exc)
            return
        built.set_result(engine)
        with torch.no_grad():
            while not self._stop.is_set():
                if not self._started.is_set():
                    engine.drain_inbox()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                engine.drain_inbox()  # admissions first, and their Started out now, not with the first token
                self._flush()
                try:
                    worked = engine.step()
                    if worked:
                        self._last_error = ""
                except Exception as exc:  # a bug must not hang every client: fail what runs, keep serving
                    self._step_failed(exc)
                    worked = True
                self._flush()
                if not worked and not engine.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
        engine.drain_inbox()
        engine.finish_all(FinishReason.CANCELLED)
        self._flush()

    def _step_failed(self, exc: Exception) -> None:
        self._failures += 1
        if repr(exc) != self._last_error:  # the traceback once, not once per step of a persistent fault
            self._log.exception("engine step failed; the running lines end with an error, the queue goes on",
                                failures=self._failures)
        self._last_error = repr(exc)
        self.engine.finish_all(FinishReason.ERROR, f"engine step failed: {exc!r}", waiting=False)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, events in outbox.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._deliver, events)

    @staticmethod
    def _deliver(events: list[tuple[RequestStream, Event]]) -> None:
        for stream, event in events:
            stream.put(event)

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Lets running requests finish for up to grace_s, then cancels the rest."""
        deadline = time.monotonic() + grace_s
        while self.engine.has_work() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        result = self.submit_many([request])[0]
        if isinstance(result, BackendError):
            raise result
        return result

    def submit_many(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Event] | BackendError]:
        """A game tick's requests, queued atomically: one event stream or refusal per request."""
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, r.request_id) for r in requests]

        def sink_for(stream: RequestStream) -> Sink:
            def sink(event: Event) -> None:  # engine thread
                self._outbox.setdefault(loop, []).append((stream, event))
            return sink

        errors = self.engine.submit_many([(r, sink_for(s)) for r, s in zip(requests, streams)])
        self._wake.set()
        return [e if e is not None else s for s, e in zip(streams, errors)]

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def check_schema(self, schema: str) -> None:
        self.engine.check_schema(schema)  # thread-safe; compiling touches no engine state

    def _call(self, fn: Callable[[], object]) -> object:
        """Runs fn on the engine thread at a step boundary and waits for it."""
        if self._thread is None:
            return fn()
        done: Future = Future()

        def command() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                done.set_exception(exc)

        self.engine.call_soon(command)
        self._wake.set()
        return done.result(timeout=60)

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        adapter = self.engine.read_adapter(name, path)
        self._call(lambda: self.engine.install_adapter(adapter))
        return adapter.info

    def unload_adapter(self, name: str) -> None:
        self._call(lambda: self.engine.remove_adapter(name))

    def adapters(self) -> dict[str, AdapterInfo]:
        return self.engine.adapters()

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.engine.stats(), step_failures=self._failures, last_error=self._last_error)

    def describe(self) -> dict[str, object]:
        return self.engine.describe()

