"""The engine: one base model, many LoRA adapters, continuous mixed-adapter batching.

`Engine` is single-threaded and synchronous: `step()` runs one forward pass,
either a prefill of newly admitted requests or one decode token for every
running request (alternating when both are waiting, so newcomers get their
first token quickly and running lines never stall for more than one step).
Everything that changes engine state from outside (submit, cancel, adapter
loads) goes through an inbox drained at step boundaries, so a forward pass
never sees its weights or batch change under it.

`AsyncEngine` runs an Engine on its own thread and exposes the
`npcd.backend.Backend` interface with asyncio streams for the daemon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from npcd import quant
from npcd.adapters import AdapterRegistry, AdapterVersion, read_peft_adapter
from npcd.backend import (AdapterInfo, BackendError, EngineStats, Event, Finished, FinishReason,
                          GenerationRequest, InvalidRequest, QueueFull, Started, TextDelta, UnknownAdapter)
from npcd.config import EngineConfig
from npcd.detokenizer import IncrementalDetokenizer
from npcd.kv_cache import KVCache, PrefixCache
from npcd.lora import GatherCache, LoraBatch, LoraStacks
from npcd.model import LlamaModel, RowBlock, StepInputs
from npcd.model_store import resolve_base
from npcd.sampler import SamplerState, sample
from npcd.scheduler import Scheduler

Sink = Callable[[Event], None]


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype, str]:
    """Where the engine runs, its activation dtype, and the quantize mode it resolves to."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} was asked for, but CUDA is not available")
    quantize = config.quantize
    if quantize == "auto":
        quantize = "lm_head_int8" if device.type == "cpu" and config.dtype in ("auto", "float32") \
            and not cpu_has_native_bf16() and quant.supported() else "none"
    if quantize == "lm_head_int8":
        if device.type != "cpu":
            raise RuntimeError(f"quantize: lm_head_int8 runs on the CPU only, but the engine would run on {device}")
        if not quant.supported():
            raise RuntimeError("quantize: lm_head_int8 needs torch's x86/fbgemm quantized engine, "
                               "which this torch build lacks")
        dtype = torch.float32
    elif config.dtype == "auto":
        native = device.type == "cuda" or cpu_has_native_bf16()
        dtype = torch.bfloat16 if native else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype, quantize


def _slot(adapter: AdapterVersion | None) -> int:
    """The LoRA stack slot a row reads, or -1 for the base model alone."""
    return adapter.slot if adapter else -1


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter: AdapterVersion | None
    sink: Sink
    arrival: float
    sampler: SamplerState
    detok: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    cached: int = 0               # prompt tokens whose KV came from the prefix cache
    kv_len: int = 0               # tokens whose KV is in the sequence's slot
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    done: bool = False

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    @property
    def cacheable_prefix(self) -> int:
        """Prompt tokens the prefix cache may hold (the persona's system turn); 0 when none applies."""
        p = self.request.prefix_len
        return p if 0 < p < len(self.prompt) else 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens its prefill will compute, for the step budget: the persona prefix is counted as cached
        (after a persona's first line it is)."""
        return len(self.prompt) - self.cacheable_prefix

    def prefix_key(self) -> tuple | None:
        p = self.cacheable_prefix
        if not p:
            return None
        version = (self.adapter.name, self.adapter.version) if self.adapter else None
        return (version, tuple(self.prompt[:p]))


class Engine:
    """Loads the base once; serves requests with per-row adapters in shared batches."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device, self.dtype, self.quantize = pick_device_dtype(config)
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        from transformers import AutoTokenizer

        model_dir = resolve_base(config.base)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_seq_len = config.max_seq_len
        self.model = LlamaModel.load(model_dir, self.dtype, self.device, config.max_seq_len,
                                     self.quantize)
        spec = self.model.spec
        self.spec = spec
        slots = KVCache.slots_for_budget(spec, config.max_seq_len, self.dtype, config.kv_cache_mb,
                                         config.max_batch_size)
        self.kv = KVCache(spec, slots, config.max_seq_len, self.dtype, self.device)
        self.stacks = LoraStacks(spec.module_shapes(), spec.num_layers, config.max_resident_adapters,
                                 self.dtype, self.device)
        self.registry = AdapterRegistry(self.stacks)
        self.prefix_cache = PrefixCache(config.prefix_cache_entries)
        self.scheduler: Scheduler[Sequence] = Scheduler(config.max_queue)
        self._gathered = GatherCache()
        self._lora_cache: tuple[tuple, LoraBatch | None] | None = None
        eos = set(spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)

        self.running: list[Sequence] = []        # index == KV slot
        self.by_id: dict[str, Sequence] = {}
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()             # guards _pending and registry.current reads
        self._pending = 0                         # submitted, not yet drained from the inbox
        self._versions = itertools.count(1)
        self._last_was_prefill = False
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.last_batch_size = 0

    # -- requests ------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidRequest(f"request {req.request_id!r}: prompt is empty")
        if n >= self.max_seq_len:
            raise InvalidRequest(f"request {req.request_id!r}: prompt has {n} tokens; max_seq_len is "
                                 f"{self.max_seq_len} and at least one token must be generated")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.spec.vocab_size:
            raise InvalidRequest(f"request {req.request_id!r}: prompt token ids must be in [0, {self.spec.vocab_size})")
        if not 0 <= req.prefix_len <= n:
            raise InvalidRequest(f"request {req.request_id!r}: prefix_len {req.prefix_len} is outside [0, {n}]")
        s = req.sampling
        checks = [
            (s.max_tokens >= 1, f"max_tokens must be >= 1, got {s.max_tokens}"),
            (s.temperature >= 0, f"temperature must be >= 0, got {s.temperature}"),
            (0 < s.top_p <= 1, f"top_p must be in (0, 1], got {s.top_p}"),
            (s.top_k >= 0, f"top_k must be >= 0, got {s.top_k}"),
            (s.repetition_penalty > 0, f"repetition_penalty must be > 0, got {s.repetition_penalty}"),
            (all(s.stop), "stop strings must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequest(f"request {req.request_id!r}: {msg}")

    def submit(self, req: GenerationRequest, sink: Sink) -> None:
        """Thread-safe: validates now, queues at the next step boundary."""
        error = self.submit_many([(req, sink)])[0]
        if error is not None:
            raise error

    def submit_many(self, items: list[tuple[GenerationRequest, Sink]]) -> list[BackendError | None]:
        """Thread-safe: queues a game tick's requests atomically, so they join the same step.

        Returns, per request, the error it was refused with, or None when queued.
        """
        errors: list[BackendError | None] = []
        accepted: list[Sequence] = []
        for req, sink in items:
            try:
                self.validate(req)
                with self._lock:
                    version = None
                    if req.adapter is not None:
                        version = self.registry.current.get(req.adapter)
                        if version is None:
                            raise UnknownAdapter(f"adapter {req.adapter!r} is not loaded")
                    if len(self.scheduler) + self._pending >= self.config.max_queue:
                        raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting); "
                                        f"try again shortly")
                    self._pending += 1
            except BackendError as exc:
                errors.append(exc)
                continue
            errors.append(None)
            accepted.append(Sequence(request=req, adapter=version, sink=sink, arrival=time.monotonic(),
                                     sampler=SamplerState(req.sampling, seen=set(req.prompt_ids)),
                                     detok=IncrementalDetokenizer(self.tokenizer, req.sampling.stop)))
        if accepted:
            self._inbox.put(lambda: [self._enqueue(seq) for seq in accepted])
        return errors

    def _enqueue(self, seq: Sequence) -> None:
        with self._lock:
            self._pending -= 1
        rid = seq.request.request_id
        if rid in self.by_id:
            seq.sink(Finished(rid, FinishReason.ERROR, "", len(seq.prompt), 0, 0, 0, 0,
                              error=f"request id {rid!r} is already in use"))
            return
        if seq.adapter is not None:
            self.registry.acquire(seq.adapter)
        self.by_id[rid] = seq
        seq.sink(Started(rid, self.scheduler.push(seq)))

    def cancel(self, request_id: str) -> None:
        """Thread-safe: the request ends (and frees its slot) at the next step boundary."""
        self._inbox.put(lambda: self._cancel(request_id))

    def _cancel(self, request_id: str) -> None:
        seq = self.by_id.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED)

    # -- adapters --------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> AdapterVersion:
        """Reads and validates on the caller's thread; nothing engine-side changes."""
        return read_peft_adapter(name, path, self.spec.module_shapes(), self.spec.num_layers,
                                 self.config.max_lora_rank, self.dtype, next(self._versions))

    def install_adapter(self, adapter: AdapterVersion) -> None:
        """Engine thread: makes the version current; old prefixes of that name are dropped."""
        old = self.registry.current.get(adapter.name)
        with self._lock:
            self.registry.install(adapter)
        if old is not None:
            self.prefix_cache.drop_version((old.name, old.version))

    def remove_adapter(self, name: str) -> None:
        old = self.registry.current.get(name)
        if old is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        with self._lock:
            self.registry.unload(name)
        self.prefix_cache.drop_version((old.name, old.version))

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Synchronous use (no engine thread): read and install at once."""
        adapter = self.read_adapter(name, path)
        self.install_adapter(adapter)
        return adapter.info

    def unload_adapter(self, name: str) -> None:
        self.remove_adapter(name)

    def adapters(self) -> dict[str, AdapterInfo]:
        with self._lock:
            return {n: dataclasses.replace(v.info, resident=v.slot is not None)
                    for n, v in self.registry.current.items()}

    # -- the step --------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running) or len(self.scheduler) > 0 or not self._inbox.empty()

    def drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    @torch.no_grad()
    def step(self) -> bool:
        """One forward pass. Returns False when there was nothing to do.

        What a step holds depends on `prefill_policy`: `alternate` prefills newcomers in a step
        of their own and then owes the running rows a decode step; `eager` prefills whenever
        requests wait; `mixed` decodes every running row and prefills the newcomers in the same
        forward, so nobody waits for anybody's prompt.
        """
        self.drain_inbox()
        self._expire(time.monotonic())
        policy = self.config.prefill_policy
        newcomers: list[Sequence] = []
        decode_owed = policy == "alternate" and self._last_was_prefill and self.running
        if len(self.scheduler) and not decode_owed:
            newcomers = self.scheduler.admit(self.kv.slots - len(self.running), self.config.prefill_token_budget,
                                             self._can_run)
        if not newcomers and not self.running:
            return False
        decoding = list(self.running) if policy == "mixed" or not newcomers else []
        self._forward(decoding, newcomers)
        self._last_was_prefill = bool(newcomers)
        self.steps += 1
        return True

    def _can_run(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.registry.make_resident(seq.adapter)

    def _expire(self, now: float) -> None:
        for seq in self.running + self.scheduler.waiting():
            if seq.request.deadline is not None and now >= seq.request.deadline:
                self._finish(seq, FinishReason.DEADLINE)

    def _lora_for(self, row_slots: list[int]) -> LoraBatch | None:
        if all(s < 0 for s in row_slots):
            return None
        key = (tuple(row_slots), self.stacks.generation)
        if self._lora_cache is None or self._lora_cache[0] != key:
            self._lora_cache = (key, LoraBatch(row_slots, self.stacks, self._gathered))
        return self._lora_cache[1]

    def _forward(self, decoding: list[Sequence], newcomers: list[Sequence]) -> None:
        """Decodes one token for `decoding` (slots 0..D-1) and prefills `newcomers` into the next slots."""
        now = time.monotonic()
        blocks: list[RowBlock] = []
        tokens: list[int] = []
        row_slots: list[int] = []
        last_index: list[int] = []
        if decoding:
            pos = [s.length - 1 for s in decoding]
            blocks.append(RowBlock(slot_start=0, positions=torch.tensor(pos, device=self.device).view(-1, 1),
                                   kv_len=max(pos) + 1))
            tokens += [s.generated[-1] for s in decoding]
            row_slots += [_slot(s.adapter) for s in decoding]
            last_index += range(len(decoding))
        misses: list[tuple[Sequence, tuple]] = []
        if newcomers:
            start = len(self.running)
            for seq in newcomers:
                seq.scheduled_at = now
                slot = len(self.running)
                self.running.append(seq)
                key = seq.prefix_key()
                if key is not None:
                    kv = self.prefix_cache.get(key)
                    if kv is not None:
                        self.kv.write(slot, kv)
                        seq.cached = seq.request.prefix_len
                    else:
                        misses.append((seq, key))
            news = [seq.prompt[seq.cached:] for seq in newcomers]
            blocks.append(self._prefill_block(news, [seq.cached for seq in newcomers], start))
            for seq, new in zip(newcomers, news):
                tokens += new
                row_slots += [_slot(seq.adapter)] * len(new)
                last_index.append(len(tokens) - 1)
            self.prompt_tokens += sum(len(t) for t in news)
        step = StepInputs(tokens=torch.tensor(tokens, device=self.device), blocks=blocks,
                          last_index=torch.tensor(last_index, device=self.device), lora=self._lora_for(row_slots))
        logits = self.model.forward(step, self.kv.k, self.kv.v)
        for seq, key in misses:
            self.prefix_cache.put(key, self.kv.read(self.running.index(seq), seq.request.prefix_len))
        for seq in decoding:
            seq.kv_len = seq.length
        for seq in newcomers:
            seq.kv_len = len(seq.prompt)
        self.last_batch_size = len(decoding) + len(newcomers)
        self._emit_tokens(decoding + newcomers, logits)

    def _prefill_block(self, news: list[list[int]], starts: list[int], slot_start: int) -> RowBlock:
        """Rows of new tokens (row i continues at position starts[i]), padded to the longest for attention."""
        T = max(len(t) for t in news)
        lengths = torch.tensor([len(t) for t in news])
        first = torch.tensor(starts)
        packed = None
        if any(len(t) != T for t in news):
            packed = (torch.arange(T) < lengths.view(-1, 1)).view(-1).nonzero().view(-1).to(self.device)
        return RowBlock(slot_start=slot_start, positions=(first.view(-1, 1) + torch.arange(T)).to(self.device),
                        kv_len=int((first + lengths).max()), packed=packed)

    def _emit_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        ids = sample(logits.cpu(), [s.sampler for s in seqs])
        now = time.monotonic()
        for seq, tok in zip(seqs, ids):
            if seq.done:
                continue
            seq.generated.append(tok)
            seq.sampler.seen.add(tok)
            self.tokens_generated += 1
            if len(seq.generated) == 1:
                seq.first_token_at = now
            rid = seq.request.request_id
            if tok in self.eos_ids and not seq.request.sampling.ignore_eos:
                self._send(seq, seq.detok.flush())
                self._finish(seq, FinishReason.STOP)
                continue
            delta, stopped = seq.detok.push(tok)
            if stopped:
                self._send(seq, delta)
                self._finish(seq, FinishReason.STOP)
            elif len(seq.generated) >= seq.request.sampling.max_tokens or seq.length >= self.max_seq_len:
                self._send(seq, delta + seq.detok.flush())
                self._finish(seq, FinishReason.LENGTH)
            elif delta:
                seq.sink(TextDelta(rid, delta))

    @staticmethod
    def _send(seq: Sequence, text: str) -> None:
        if text:
            seq.sink(TextDelta(seq.request.request_id, text))

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self.running:
            self._free_slot(self.running.index(seq))
        else:
            self.scheduler.discard(seq)
        if seq.adapter is not None:
            self.registry.release(seq.adapter)
        del self.by_id[seq.request.request_id]
        now = time.monotonic()
        ms = lambda t: (t - seq.arrival) * 1000.0 if t else 0.0  # noqa: E731
        seq.sink(Finished(
            request_id=seq.request.request_id, reason=reason, text=seq.detok.text[:seq.detok.emitted],
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated),
            queued_ms=ms(seq.scheduled_at or now), first_token_ms=ms(seq.first_token_at),
            total_ms=ms(now), cached_prompt_tokens=seq.cached, error=error))

    def _free_slot(self, slot: int) -> None:
        last = len(self.running) - 1
        if slot != last:
            moved = self.running[last]
            self.kv.move(last, slot, moved.kv_len)
            self.running[slot] = moved
        self.running.pop()

    # -- offline use -------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Finished]:
        """Runs requests to completion in the caller's thread (benchmarks, eval, tests)."""
        results: dict[str, Finished] = {}

        def sink(event: Event) -> None:
            if isinstance(event, Finished):
                results[event.request_id] = event

        for req in requests:
            self.submit(req, sink)
        while len(results) < len(requests):
            if not self.step() and not self.has_work():
                break
        return [results[r.request_id] for r in requests]

    @torch.no_grad()
    def score(self, prompts: list[list[int]], adapters: list[str | None]) -> list[torch.Tensor]:
        """Next-token logits at every position of each prompt, all in one mixed-adapter batch.

        Uses free KV slots as scratch; call it only while nothing is running.
        """
        if self.running or len(self.scheduler):
            raise RuntimeError("score() needs an idle engine")
        if len(prompts) > self.kv.slots:
            raise ValueError(f"score() takes at most {self.kv.slots} prompts at once")
        versions = []
        for name in adapters:
            version = self.registry.current.get(name) if name else None
            if name and version is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            versions.append(version)
        distinct = {id(v): v for v in versions if v is not None}.values()
        for version in distinct:  # held, so making one resident cannot evict another of this batch
            self.registry.acquire(version)
        try:
            if not all(self.registry.make_resident(v) for v in distinct):
                raise RuntimeError(f"score() takes at most max_resident_adapters={self.stacks.slots} "
                                   f"distinct adapters at once")
            return self._score(prompts, versions)
        finally:
            for version in distinct:
                self.registry.release(version)

    def _score(self, prompts: list[list[int]], versions: list[AdapterVersion | None]) -> list[torch.Tensor]:
        row_slots = [_slot(v) for v, p in zip(versions, prompts) for _ in p]
        lengths = torch.tensor([len(p) for p in prompts])
        step = StepInputs(tokens=torch.tensor([t for p in prompts for t in p], device=self.device),
                          blocks=[self._prefill_block(prompts, [0] * len(prompts), 0)],
                          last_index=(lengths.cumsum(0) - 1).to(self.device), lora=self._lora_for(row_slots),
                          all_logits=True)
        logits = self.model.forward(step, self.kv.k, self.kv.v)
        return list(logits.split(lengths.tolist()))

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=len(self.scheduler) + self._pending, running=len(self.running),
            max_batch_size=self.kv.slots, adapters_resident=self.registry.resident,
            adapters_known=len(self.registry.current), tokens_generated=self.tokens_generated,
            prompt_tokens=self.prompt_tokens, prefix_cache_hits=self.prefix_cache.hits,
            prefix_cache_misses=self.prefix_cache.misses, steps=self.steps, last_batch_size=self.last_batch_size)


class RequestStream:
    """Async iterator over one request's events; delivered on the submitting loop."""

    def __init__(self, engine: "AsyncEngine", request_id: str):
        self._engine, self.request_id = engine, request_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def put(self, event: Event) -> None:
        self._queue.put_nowait(event)

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
    """An Engine on its own thread, behind the Backend interface.

    Events produced during a step are handed to each asyncio loop in one batch
    (one call_soon_threadsafe per loop per step), not one wake-up per token.
    """

    def __init__(self, config: EngineConfig):
        self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        self.error: BaseException | None = None

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="npcd-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with torch.no_grad():
            while not self._stop.is_set():
                try:
                    worked = self.engine.step()
                except Exception as exc:  # a bug must not hang every client: fail what runs, keep serving
                    self.error = exc
                    self._fail_running(exc)
                    worked = True
                self._flush()
                if not worked and not self.engine.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
        self.engine.drain_inbox()
        for seq in list(self.engine.running) + self.engine.scheduler.waiting():
            self.engine._finish(seq, FinishReason.CANCELLED)
        self._flush()

    def _fail_running(self, exc: BaseException) -> None:
        for seq in list(self.engine.running):
            self.engine._finish(seq, FinishReason.ERROR, error=f"engine step failed: {exc!r}")

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

        self.engine._inbox.put(command)
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
        return self.engine.stats()

