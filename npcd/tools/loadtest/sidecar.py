"""What every baseline sidecar shares: the daemon's gRPC API over a one-request-at-a-time generator.

A baseline is what a game would run without npcd. To measure only what npcd
adds (batching across requests and adapters, the persona prefix cache), each
baseline takes everything else from this module, and so from the daemon:
the prompts (`PromptBuilder`), the request validation and persona sampling
defaults (`npcd.service.validation`), the `max_seq_len` rule, the end-of-turn
ids, stop strings and incremental detokenizer (`TokenStream`), and the gRPC
API (Say, Session, ListPersonas) the load test drives every target through.
A baseline only says how it turns prompt ids into generated ids
(`OneAtATimeGenerator._decode`); requests run one after another on a single
worker thread, in arrival order, as a simple sidecar would run them.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc

from npcd.engine.api import SamplingParams
from npcd.engine.detokenizer import IncrementalDetokenizer
from npcd.personas.loader import Persona
from npcd.personas.prompt import PromptBuilder, PromptError
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.service.config import Limits
from npcd.service.validation import DEFAULT_SPEAKER, RequestError, sampling_for, validate

STOP_GRACE_S = 1.0  # in-flight RPCs get this long when the sidecar is asked to stop


@dataclass
class Outcome:
    reason: int          # a pb.FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    started: float       # time.monotonic() when generation began
    first_token: float   # 0 when no token was produced


def end_of_turn_ids(base_dir: Path, tokenizer: Any) -> frozenset[int]:
    """The ids that end a line: the base's generation config (as transformers' `generate` reads it) and the
    tokenizer's end-of-sequence token, so that every baseline stops exactly where the naive one does."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(base_dir)
    except OSError:  # no generation_config.json: transformers derives it from config.json
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(base_dir))
    eos = config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class TokenStream:
    """One request's generated ids turned into text deltas by the daemon's rules: an end-of-turn id or a stop
    string ends the line (STOP), `max_tokens` ends it too (LENGTH); held-back text is sent at a LENGTH end."""

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: frozenset[int], emit: Callable[[str], None]):
        self.detok = IncrementalDetokenizer(tokenizer, stop=params.stop)
        self.params = params
        self.eos_ids = eos_ids
        self.emit = emit
        self.tokens = 0
        self.first_token = 0.0
        self.reason = pb.FINISH_REASON_LENGTH
        self.done = False

    def push(self, token_id: int) -> bool:
        """Takes one generated id; True once the line has ended (the id that ended it is counted)."""
        if self.done:
            return True
        self.tokens += 1
        self.first_token = self.first_token or time.monotonic()
        if token_id in self.eos_ids and not self.params.ignore_eos:
            delta, self.done = self.detok.flush(), True
        else:
            delta, self.done = self.detok.push(token_id)
        if self.done:
            self.reason = pb.FINISH_REASON_STOP
        elif self.tokens >= self.params.max_tokens:
            self.done = True
        if delta:
            self.emit(delta)
        return self.done

    def outcome(self, prompt_tokens: int, started: float, cancelled: threading.Event) -> Outcome:
        reason = self.reason
        if cancelled.is_set() and not self.done:
            reason = pb.FINISH_REASON_CANCELLED
        elif reason == pb.FINISH_REASON_LENGTH:
            tail = self.detok.flush()
            if tail:
                self.emit(tail)
        return Outcome(reason, self.detok.text[:self.detok.emitted], prompt_tokens, self.tokens, started,
                       self.first_token)


class OneAtATimeGenerator(ABC):
    """The part of a baseline that generates: the base's tokenizer and prompts, and one worker thread."""

    name = "sidecar"  # how logs and errors call this baseline

    def __init__(self, base_dir: Path, personas: dict[str, Persona], max_seq_len: int):
        from transformers import AutoTokenizer

        self.personas = personas
        self.max_seq_len = max_seq_len
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.prompts = PromptBuilder(self.tokenizer)
        self.eos_ids = end_of_turn_ids(base_dir, self.tokenizer)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-generate")

    def generate(self, persona: Persona, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[str], None], cancelled: threading.Event) -> Outcome:
        """Runs on the worker thread; `emit` receives text deltas as they are decoded."""
        started = time.monotonic()
        stream = TokenStream(self.tokenizer, params, self.eos_ids, emit)
        if not cancelled.is_set():  # else the client left while this request waited its turn
            self._decode(persona, prompt_ids, params, stream, cancelled)
        return stream.outcome(len(prompt_ids), started, cancelled)

    @abstractmethod
    def _decode(self, persona: Persona, prompt_ids: list[int], params: SamplingParams, stream: TokenStream,
                cancelled: threading.Event) -> None:
        """Generates with `persona`'s adapter, pushing every id into `stream`, until it is done or `cancelled`."""

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


class OneAtATimeServicer(npcd_pb2_grpc.NpcdServicer):
    def __init__(self, generator: OneAtATimeGenerator, limits: Limits = Limits()):
        self.gen = generator
        self.limits = limits
        self.waiting = 0  # requests accepted and not yet finished: the queue position of the next one

    def _prepare(self, req: pb.SayRequest) -> tuple[Persona, list[int], SamplingParams]:
        """Persona, prompt ids and sampling of a request, or the RequestError the daemon would answer."""
        validate(req, self.limits)
        persona = self.gen.personas.get(req.persona)
        if persona is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown persona {req.persona!r}")
        try:
            prompt = self.gen.prompts.build(persona, speaker=req.speaker or DEFAULT_SPEAKER, line=req.line,
                                            history=req.history, context=dict(req.context), npc_id=req.npc_id)
        except PromptError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: {exc}") from None
        n = len(prompt.ids)
        if n >= self.gen.max_seq_len:  # the daemon's rule, worded as the daemon words it
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request {req.request_id!r}: prompt has {n} tokens; max_seq_len is "
                               f"{self.gen.max_seq_len} and at least one token must be generated")
        params = sampling_for(persona, req.sampling, self.limits)
        return persona, prompt.ids, replace(params, max_tokens=min(params.max_tokens, self.gen.max_seq_len - n))

    async def _events(self, req: pb.SayRequest, cancelled: threading.Event) -> AsyncIterator[pb.Event]:
        """Started, TextDelta*, Finished; raises RequestError before the first event if the request is refused."""
        received = time.monotonic()
        persona, prompt_ids, params = self._prepare(req)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        rid = req.request_id
        yield pb.Event(request_id=rid, started=pb.Started(queue_position=self.waiting))
        self.waiting += 1
        try:
            job = loop.run_in_executor(self.gen.worker, self.gen.generate, persona, prompt_ids, params,
                                       lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text), cancelled)
            job.add_done_callback(lambda _: loop.call_soon(deltas.put_nowait, None))
            while (text := await deltas.get()) is not None:
                yield pb.Event(request_id=rid, delta=pb.TextDelta(text=text))
            out = await job
        finally:
            cancelled.set()  # a no-op after a normal finish; stops generation if the client went away
            self.waiting -= 1
        ms = lambda t: (t - received) * 1000.0 if t else 0.0  # noqa: E731
        yield pb.Event(request_id=rid, finished=pb.Finished(
            reason=out.reason, text=out.text, prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            timings=pb.Timings(queued_ms=ms(out.started), first_token_ms=ms(out.first_token),
                               total_ms=ms(time.monotonic()))))

    async def Say(self, request: pb.SayRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        try:
            async for event in self._events(request, threading.Event()):
                yield event
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    async def Session(self, request_iterator: AsyncIterator[pb.Tick],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        out: asyncio.Queue[pb.Event | None] = asyncio.Queue()  # None: the session is over
        cancels: dict[str, threading.Event] = {}
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.SayRequest) -> None:
            try:
                async for event in self._events(req, cancels[req.request_id]):
                    out.put_nowait(event)
            except RequestError as exc:
                out.put_nowait(exc.event(req.request_id))
            finally:
                cancels.pop(req.request_id, None)

        async def read() -> None:
            try:
                async for tick in request_iterator:
                    for cancel in tick.cancels:
                        if cancel.request_id in cancels:
                            cancels[cancel.request_id].set()
                    for req in tick.requests:
                        cancels[req.request_id] = threading.Event()
                        tasks.add(asyncio.create_task(one(req)))
                await asyncio.gather(*tasks)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (event := await out.get()) is not None:
                yield event
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def ListPersonas(self, request: pb.ListPersonasRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListPersonasResponse:
        return pb.ListPersonasResponse(personas=[
            pb.Persona(id=p.id, display_name=p.display_name, description=p.description, status=pb.LOAD_STATUS_READY,
                       source=str(p.source)) for p in sorted(self.gen.personas.values(), key=lambda p: p.id)])


async def serve(listen: str, make_generator: Callable[[], OneAtATimeGenerator],
                on_listening: Callable[[str], None]) -> None:
    """Builds the generator (off the event loop: it loads a model), serves it on `listen` until SIGTERM or
    SIGINT, then stops. `on_listening` gets the bound HOST:PORT (port 0 in `listen` picks a free one)."""
    generator = await asyncio.to_thread(make_generator)
    server = grpc.aio.server()
    npcd_pb2_grpc.add_NpcdServicer_to_server(OneAtATimeServicer(generator), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    on_listening(f"{listen.rpartition(':')[0]}:{port}")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(STOP_GRACE_S)
    generator.close()
