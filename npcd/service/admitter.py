"""Game-tick admission: requests arriving within a short window go to the engine together."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from npcd.engine.api import Backend, BackendError, GenerationRequest


class Admitter:
    """Gathers requests that arrive within a short window and submits them in one loop iteration.

    Submitting together lets the engine admit them into the same prefill; sorting
    by priority first means that when the queue is nearly full, the player's
    line gets the last place rather than a crowd bark.
    """

    def __init__(self, backend: Backend, window_s: float):
        self._backend = backend
        self._window_s = window_s
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def admit(self, requests: list[GenerationRequest]) -> list[AsyncIterator | BackendError]:
        """One result per request: its event stream, or the error the engine refused it with."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(zip(requests, futures))
        if self._window_s <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window_s, self._flush)
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            # The caller went away; anything already submitted for it must not run unobserved.
            for request, future in zip(requests, futures):
                if future.done() and not future.cancelled() and not isinstance(future.result(), BackendError):
                    self._backend.cancel(request.request_id)
            raise

    def _flush(self) -> None:
        self._timer = None
        batch, self._pending = self._pending, []
        batch.sort(key=lambda item: -item[0].priority)  # stable: arrival order within a priority
        if not batch:
            return
        results = self._backend.submit_many([request for request, _ in batch])
        for (request, future), result in zip(batch, results):
            if future.cancelled():  # the caller went away while waiting for the window
                if not isinstance(result, BackendError):
                    self._backend.cancel(request.request_id)
                continue
            future.set_result(result)
