"""Replays an arrival schedule against a server over gRPC and times every request.

Times are taken on the client, as a game would see them: time to first token
is from handing the request to gRPC to the first text delta, so it includes
the network, the server's tick window, queueing and prefill. The server's own
`queued_ms` is recorded beside it to tell queueing apart from the rest.

Every request ends in exactly one way: finished (OK), an error the server
sent (its status name), or cut off by the client when the drain time after
the run is up (DEADLINE_EXCEEDED). Nothing is retried.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.tools.loadtest.scenario import Arrival, PersonaRef, Scenario

LIVE_WINDOW_S = 10.0   # live tokens/s and TTFT percentiles cover this much recent time
CONNECT_TIMEOUT_S = 10.0


@dataclass
class RequestRecord:
    """One request's fate. Times are seconds from the start of the run."""

    request_id: str
    npc: int
    persona: str
    player: bool
    burst: bool
    scheduled_s: float
    sent_s: float | None = None  # None: never sent (its client's session failed first)
    first_token_s: float | None = None
    finished_s: float | None = None
    last_delta_s: float | None = None
    gaps_ms: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    server_queued_ms: float | None = None
    finish_reason: str = ""
    text: str = ""
    status: str = ""       # OK, or the gRPC status name of what went wrong
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_s is None or self.sent_s is None:
            return None
        return (self.first_token_s - self.sent_s) * 1000.0

    @property
    def total_ms(self) -> float | None:
        if self.finished_s is None or self.sent_s is None:
            return None
        return (self.finished_s - self.sent_s) * 1000.0

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(v, 2)  # noqa: E731
        return {
            "request_id": self.request_id, "npc": self.npc, "persona": self.persona, "player": self.player,
            "burst": self.burst, "scheduled_s": r(self.scheduled_s), "sent_s": r(self.sent_s),
            "status": self.status, "error": self.error, "finish_reason": self.finish_reason,
            "ttft_ms": r(self.ttft_ms), "total_ms": r(self.total_ms), "server_queued_ms": r(self.server_queued_ms),
            "completion_tokens": self.completion_tokens, "prompt_tokens": self.prompt_tokens, "text": self.text,
            "gaps_ms": [round(g, 1) for g in self.gaps_ms],
        }


class Progress:
    """Counters the live display reads while the run goes on (same thread, no locks needed)."""

    def __init__(self, label: str, total: int):
        self.label = label
        self.total = total
        self.start = time.perf_counter()
        self.sent = 0
        self.done = 0
        self.errors = 0
        self._deltas: collections.deque[float] = collections.deque()
        self._ttfts: collections.deque[tuple[float, float]] = collections.deque()

    def now(self) -> float:
        return time.perf_counter() - self.start

    @property
    def in_flight(self) -> int:
        return self.sent - self.done - self.errors

    def delta(self, at: float) -> None:
        self._deltas.append(at)

    def first_token(self, at: float, ttft_ms: float) -> None:
        self._ttfts.append((at, ttft_ms))

    def _trim(self) -> float:
        cutoff = self.now() - LIVE_WINDOW_S
        while self._deltas and self._deltas[0] < cutoff:
            self._deltas.popleft()
        while self._ttfts and self._ttfts[0][0] < cutoff:
            self._ttfts.popleft()
        return min(LIVE_WINDOW_S, max(self.now(), 1e-3))

    def deltas_per_s(self) -> float:
        """Text deltas per second, recently: close to tokens/s (a delta is one token, or a few held back)."""
        return len(self._deltas) / self._trim()

    def recent_ttft_ms(self, q: float) -> float | None:
        self._trim()
        values = sorted(v for _, v in self._ttfts)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _request(a: Arrival, scenario: Scenario) -> pb.SayRequest:
    return pb.SayRequest(
        request_id=a.request_id, persona=a.persona, npc_id=f"npc{a.npc}", speaker=a.speaker, line=a.line,
        history=[pb.Turn(speaker=s, text=t) for s, t in a.history], context=a.context,
        sampling=pb.SamplingOverrides(max_tokens=scenario.max_tokens, temperature=scenario.temperature,
                                      seed=a.index),
        priority=pb.PRIORITY_PLAYER if a.player else pb.PRIORITY_AMBIENT,
    )


def _on_event(record: RequestRecord, event: pb.Event, progress: Progress) -> bool:
    """Updates the record; True once the request has ended."""
    kind = event.WhichOneof("kind")
    now = progress.now()
    if kind == "delta":
        if record.first_token_s is None:
            record.first_token_s = now
            progress.first_token(now, record.ttft_ms or 0.0)
        else:
            record.gaps_ms.append((now - record.last_delta_s) * 1000.0)
        record.last_delta_s = now
        progress.delta(now)
        return False
    if kind == "finished":
        f = event.finished
        record.finished_s = now
        if record.first_token_s is None:  # a line with no text at all: its first token is its end
            record.first_token_s = now
        record.completion_tokens, record.prompt_tokens = f.completion_tokens, f.prompt_tokens
        record.server_queued_ms = f.timings.queued_ms
        record.text = f.text
        record.finish_reason = pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower()
        _end(record, progress, "OK")
        return True
    if kind == "error":
        _end(record, progress, event.error.status or str(event.error.code), event.error.message)
        return True
    return False


def _end(record: RequestRecord, progress: Progress, status: str, error: str = "") -> None:
    if record.status:
        return
    record.status, record.error = status, error
    if status == "OK":
        progress.done += 1
    else:  # its first token and gaps stay recorded (they show what streamed); statistics use OK lines only
        progress.errors += 1


async def list_personas(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> list[PersonaRef]:
    """The target's ready personas, sorted by id."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await npcd_pb2_grpc.NpcdStub(channel).ListPersonas(pb.ListPersonasRequest(), timeout=timeout_s)
    return sorted((PersonaRef(p.id, p.display_name or p.id, p.HasField("adapter")) for p in reply.personas
                   if p.status == pb.LOAD_STATUS_READY), key=lambda p: p.id)


class TrafficRun:
    """One replay of a schedule against one address, with `clients` gRPC channels."""

    def __init__(self, address: str, scenario: Scenario, schedule: list[Arrival], progress: Progress):
        self.address = address
        self.scenario = scenario
        self.schedule = schedule
        self.progress = progress
        self.records = {a.request_id: RequestRecord(a.request_id, a.npc, a.persona, a.player, a.burst, a.at_s)
                        for a in schedule}
        self.cutoff_s = scenario.duration_s + scenario.drain_s  # nothing runs past this

    async def _wait_until(self, at_s: float) -> None:
        delay = at_s - self.progress.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def _remaining(self) -> float:
        return max(0.001, self.cutoff_s - self.progress.now())

    async def run(self) -> list[RequestRecord]:
        channels = [grpc.aio.insecure_channel(self.address) for _ in range(self.scenario.clients)]
        try:
            stubs = [npcd_pb2_grpc.NpcdStub(c) for c in channels]
            await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), CONNECT_TIMEOUT_S) for c in channels))
            self.progress.start = time.perf_counter()
            if self.scenario.api == "say":
                await self._run_say(stubs)
            else:
                await asyncio.gather(*(self._run_session(stub, client) for client, stub in enumerate(stubs)))
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        for record in self.records.values():
            if record.sent_s is None:
                record.status = "NOT_SENT"
            else:  # anything left was still running at the cutoff
                _end(record, self.progress, "DEADLINE_EXCEEDED", "cut off by the load test's drain time")
        return [self.records[a.request_id] for a in self.schedule]

    # --- one Say stream per line ---------------------------------------------------

    async def _run_say(self, stubs: list[npcd_pb2_grpc.NpcdStub]) -> None:
        tasks = []
        for a in self.schedule:
            await self._wait_until(a.at_s)
            tasks.append(asyncio.create_task(self._say(stubs[a.client], a)))
        await asyncio.gather(*tasks)

    async def _say(self, stub: npcd_pb2_grpc.NpcdStub, a: Arrival) -> None:
        record = self.records[a.request_id]
        record.sent_s = self.progress.now()
        self.progress.sent += 1
        call = stub.Say(_request(a, self.scenario), timeout=self._remaining())
        try:
            async for event in call:
                if _on_event(record, event, self.progress):
                    break
            else:
                _end(record, self.progress, "INTERNAL", "the stream ended without Finished")
        except grpc.aio.AioRpcError as exc:
            _end(record, self.progress, exc.code().name, exc.details() or "")
        finally:
            call.cancel()

    # --- one Session per client -------------------------------------------------------

    async def _run_session(self, stub: npcd_pb2_grpc.NpcdStub, client: int) -> None:
        mine = [a for a in self.schedule if a.client == client]
        if not mine:
            return
        call = stub.Session(self._ticks(mine), timeout=self._remaining())
        try:
            async for event in call:
                record = self.records.get(event.request_id)
                if record is not None:
                    _on_event(record, event, self.progress)
        except grpc.aio.AioRpcError as exc:
            for a in mine:
                if self.records[a.request_id].sent_s is not None:
                    _end(self.records[a.request_id], self.progress, exc.code().name, exc.details() or "")

    async def _ticks(self, arrivals: list[Arrival]) -> AsyncIterator[pb.Tick]:
        """One Tick per game tick that has lines; the stream half-closes after the last one."""
        by_tick: dict[int, list[Arrival]] = {}
        for a in arrivals:
            by_tick.setdefault(a.tick, []).append(a)
        for tick, group in by_tick.items():
            await self._wait_until(group[0].at_s)
            now = self.progress.now()
            for a in group:
                self.records[a.request_id].sent_s = now
            self.progress.sent += len(group)
            yield pb.Tick(tick=tick, requests=[_request(a, self.scenario) for a in group])
