"""The naive sidecar: what a game would run without npcd, as the load test's baseline.

One request at a time: transformers `generate` on the base model wrapped by
PEFT, the persona's adapter switched in with `set_adapter` before each
request (personas without an adapter run with adapters disabled). It speaks
the same gRPC API (Say, Session, ListPersonas) so the load test drives it
through the very same client code, and it is fair on every point that is not
the thing being measured: the same prompts (`PromptBuilder`), request
validation and sampling defaults as the daemon (`npcd.service.servicer`), the same
end-of-turn ids and stop strings, the same incremental detokenizer, the same
dtype (fp32) and thread count. What it lacks is exactly what npcd adds:
batching across requests and adapters, and the persona prefix cache.

Run it on its own (the load test starts it as a subprocess):

    python -m npcd.tools.loadtest.naive --listen 127.0.0.1:0 --personas personas
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from npcd.service.validation import (
    DEFAULT_SPEAKER,
    RequestError,
    sampling_for,
    validate,
)


@dataclass
class _Outcome:
    reason: int          # a pb.FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    started: float       # time.monotonic() when generation began
    first_token: float   # 0 when no token was produced


class NaiveGenerator:
    """transformers + PEFT, one request at a time on one worker thread."""

    def __init__(self, base_dir: Path, personas: dict[str, Persona], threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        with_adapter = sorted((p for p in personas.values() if p.adapter_path is not None), key=lambda p: p.id)
        if with_adapter:
            from peft import PeftModel

            first, *rest = with_adapter
            model = PeftModel.from_pretrained(model, str(first.adapter_path), adapter_name=first.id)
            for p in rest:
                model.load_adapter(str(p.adapter_path), adapter_name=p.id)
            model.eval()
        self.model = model
        self.is_peft = bool(with_adapter)
        self.personas = personas
        self.prompts = PromptBuilder(self.tokenizer)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive-generate")

    def generate(self, persona: Persona, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[str], None], cancelled: threading.Event) -> _Outcome:
        """Runs on the worker thread; `emit` receives text deltas as they are decoded."""
        from transformers import (
            GenerationConfig,
            StoppingCriteria,
            StoppingCriteriaList,
        )
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        started = time.monotonic()
        detok = IncrementalDetokenizer(self.tokenizer, stop=params.stop)
        state = {"prompt": True, "tokens": 0, "first": 0.0, "reason": pb.FINISH_REASON_LENGTH, "done": False}
        eos_ids = self.eos_ids

        class Streamer(BaseStreamer):
            def put(self, value: Any) -> None:
                if state["prompt"]:  # generate() hands the prompt over first
                    state["prompt"] = False
                    return
                for tok in value.reshape(-1).tolist():
                    if state["done"]:
                        return
                    state["tokens"] += 1
                    state["first"] = state["first"] or time.monotonic()
                    if tok in eos_ids and not params.ignore_eos:
                        delta, state["done"] = detok.flush(), True
                        state["reason"] = pb.FINISH_REASON_STOP
                    else:
                        delta, stopped = detok.push(tok)
                        if stopped:
                            state["done"], state["reason"] = True, pb.FINISH_REASON_STOP
                    if delta:
                        emit(delta)

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), state["done"] or cancelled.is_set(), dtype=torch.bool)

        if cancelled.is_set():  # the client left while this request waited its turn
            return _Outcome(pb.FINISH_REASON_CANCELLED, "", len(prompt_ids), 0, started, 0.0)
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                        "top_k": params.top_k or None}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        config = GenerationConfig(max_new_tokens=params.max_tokens, repetition_penalty=params.repetition_penalty,
                                  eos_token_id=None if params.ignore_eos else sorted(eos_ids),
                                  pad_token_id=self.tokenizer.eos_token_id, **sampling)
        adapters = contextlib.nullcontext()
        if persona.adapter_path is not None:
            self.model.set_adapter(persona.id)
        elif self.is_peft:
            adapters = self.model.disable_adapter()
        with torch.inference_mode(), adapters:
            self.model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                dtype=torch.long), generation_config=config, streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([Stop()]))
        reason = state["reason"]
        if cancelled.is_set() and not state["done"]:
            reason = pb.FINISH_REASON_CANCELLED
        elif reason == pb.FINISH_REASON_LENGTH:
            tail = detok.flush()
            if tail:
                emit(tail)
        return _Outcome(reason, detok.text[:detok.emitted], len(prompt_ids), state["tokens"], started, state["first"])


class NaiveServicer(npcd_pb2_grpc.NpcdServicer):
    def __init__(self, generator: NaiveGenerator, limits: Limits = Limits()):
        self.gen = generator
        self.limits = limits
        self.waiting = 0  # requests accepted and not yet finished: the queue position of the next one

    async def _events(self, req: pb.SayRequest, cancelled: threading.Event) -> AsyncIterator[pb.Event]:
        """Started, TextDelta*, Finished; raises RequestError before the first event if the request is refused."""
        received = time.monotonic()
        validate(req, self.limits)
        persona = self.gen.personas.get(req.persona)
        if persona is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown persona {req.persona!r}")
        try:
            prompt = self.gen.prompts.build(persona, speaker=req.speaker or DEFAULT_SPEAKER, line=req.line,
                                            history=req.history, context=dict(req.context), npc_id=req.npc_id)
        except PromptError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: {exc}") from None
        params = sampling_for(persona, req.sampling, self.limits)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        rid = req.request_id
        yield pb.Event(request_id=rid, started=pb.Started(queue_position=self.waiting))
        self.waiting += 1
        try:
            job = loop.run_in_executor(self.gen.worker, self.gen.generate, persona, prompt.ids, params,
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
