"""The engine: one base model, many LoRA adapters, continuous mixed-adapter batching.

`Engine` is single-threaded and synchronous. `step()` is three calls: the
scheduler decides what the step holds (admission, KV slots, prefix-cache hits,
per `prefill_policy`), the runner builds the step's tensors and runs the
model, the postprocessor samples, detokenizes and says who finished.
Everything that changes engine state from outside (submit, cancel, adapter
loads) goes through an inbox drained at step boundaries, so a forward pass
never sees its weights or batch change under it.

`npcd.engine.async_engine.AsyncEngine` runs an Engine on its own thread behind
the `npcd.engine.api.Backend` interface.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from typing import Callable

import torch

from npcd.engine.adapters import AdapterRegistry, AdapterVersion, read_peft_adapter
from npcd.engine.api import (
    SAMPLING_BOUNDS,
    STOP_CHARS,
    AdapterInfo,
    BackendError,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    Started,
    UnknownAdapter,
)
from npcd.engine.config import EngineConfig
from npcd.engine.detokenizer import IncrementalDetokenizer
from npcd.engine.grammar import Grammars
from npcd.engine.kv_cache import KVCache, PrefixCache
from npcd.engine.lora import LoraStacks
from npcd.engine.model import LlamaModel
from npcd.engine.platform import cpu_model_name, place
from npcd.engine.postprocess import Postprocessor
from npcd.engine.quant import lora_dtype
from npcd.engine.runner import ModelRunner
from npcd.engine.sampler import SamplerState
from npcd.engine.scheduler import Scheduler
from npcd.engine.sequence import Sequence, Sink
from npcd.engine.weights import resolve_base


RETRY_MIN_MS, RETRY_MAX_MS = 50, 30_000  # a retry hint is never "now" nor "give up"


class Engine:
    """Loads the base once; serves requests with per-row adapters in shared batches."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.placement = place(config)
        self.device = self.placement.device
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        from transformers import AutoTokenizer

        model_dir = resolve_base(config.base)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_seq_len = config.max_seq_len
        self.model = LlamaModel.load(model_dir, self.placement.weights, self.device, config.max_seq_len)
        self.dtype = self.model.dtype
        spec = self.model.spec
        self.spec = spec
        slots = KVCache.slots_for_budget(spec, config.max_seq_len, self.dtype, config.kv_cache_mb,
                                         config.max_batch_size)
        self.kv = KVCache(spec, slots, config.max_seq_len, self.dtype, self.device)
        self.stacks = LoraStacks(spec.module_shapes(), spec.num_layers, config.max_resident_adapters,
                                 lora_dtype(self.placement.weights), self.device)
        self.registry = AdapterRegistry(self.stacks)
        self.prefix_cache = PrefixCache(config.prefix_cache_mb << 20)
        eos = set(spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.scheduler = Scheduler(config, self.kv, self.prefix_cache, self._can_run)
        self.runner = ModelRunner(self.model, self.kv, self.stacks, self.prefix_cache, self.device)
        self.postprocessor = Postprocessor(self.eos_ids, config.max_seq_len, spec.vocab_size)
        self.grammars = Grammars(self.tokenizer, spec.vocab_size, self.eos_ids)
        self.warmup_ms = self._warm_up()

        self.by_id: dict[str, Sequence] = {}
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()             # guards _pending and registry.current reads
        self._pending = 0                         # submitted, not yet drained from the inbox
        self._versions = itertools.count(1)
        self.steps = 0
        self.last_batch_size = 0
        self.last_step_s = 0.0
        self.preempted = 0  # ambient lines shed for player lines, since start

    @property
    def running(self) -> list[Sequence]:
        """The running batch; index == KV slot."""
        return self.scheduler.running

    # -- requests ------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        """InvalidRequest naming what does not fit; not the request id: the caller knows which it submitted (and a
        server's client knows the request by its own id, not the engine's)."""
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidRequest("prompt is empty")
        if n >= self.max_seq_len:
            raise InvalidRequest(f"prompt has {n} tokens; max_seq_len is {self.max_seq_len} and at least one token "
                                 f"must be generated")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.spec.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        if not 0 <= req.prefix_len <= n:
            raise InvalidRequest(f"prefix_len {req.prefix_len} is outside [0, {n}]")
        # the bounds personas and wire requests are held to (npcd.engine.api), so every caller gets the same answer
        s = req.sampling
        for name, bound in SAMPLING_BOUNDS.items():
            problem = bound.check(getattr(s, name))
            if problem:
                raise InvalidRequest(f"{name} {problem}")
        for i, stop in enumerate(s.stop):
            problem = STOP_CHARS.check(len(stop))
            if problem:
                raise InvalidRequest(f"stop[{i}] {problem}")

    def retry_after_ms(self) -> int:
        """About when a queue place frees: the running line closest to its budget's end finishes (at the last
        step's time per token); bounded to [RETRY_MIN_MS, RETRY_MAX_MS]. Read from another thread: an estimate."""
        left = [seq.token_budget - len(seq.generated) for seq in list(self.running)]
        ms = min(left, default=1) * self.last_step_s * 1000
        return int(min(max(ms, RETRY_MIN_MS), RETRY_MAX_MS))

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
                grammar = self.grammars.row(req.structured, req.sampling.max_tokens) if req.structured else None
                with self._lock:
                    version = None
                    if req.adapter is not None:
                        version = self.registry.current.get(req.adapter)
                        if version is None:
                            raise UnknownAdapter(f"adapter {req.adapter!r} is not loaded")
                    queue = self.config.max_queue - (0 if req.priority > 0 else self.config.player_queue_reserve)
                    full = len(self.scheduler.waiting) + self._pending >= queue
                    if full and self.scheduler.queue_hog(req.client) is None:
                        retry = self.retry_after_ms()
                        raise QueueFull(f"the request queue is full ({queue} waiting"
                                        f"{'' if req.priority > 0 else ', the rest kept for player lines'}); "
                                        f"try again in about {retry} ms", retry)
                    self._pending += 1
            except BackendError as exc:
                errors.append(exc)
                continue
            errors.append(None)
            accepted.append(Sequence(request=req, adapter=version, sink=sink,
                                     sampler=SamplerState(req.sampling, seen=set(req.prompt_ids)),
                                     detok=IncrementalDetokenizer(self.tokenizer, () if grammar else req.sampling.stop),
                                     grammar=grammar))
        if accepted:
            self._inbox.put(lambda: [self._enqueue(seq) for seq in accepted])
        return errors

    def _enqueue(self, seq: Sequence) -> None:
        with self._lock:
            self._pending -= 1
        limit = self.config.max_queue - (0 if seq.priority > 0 else self.config.player_queue_reserve)
        if len(self.scheduler.waiting) >= limit:  # admitted over a client above its share of the queue
            hog = self.scheduler.queue_hog(seq.client)
            if hog is not None:
                self.preempted += 1
                self._finish(hog, FinishReason.PREEMPTED)
        rid = seq.request.request_id
        if rid in self.by_id:
            seq.sink(Finished(rid, FinishReason.ERROR, "", len(seq.prompt), 0, 0, 0, 0,
                              error=f"request id {rid!r} is already in use"))
            return
        if seq.adapter is not None:
            self.registry.acquire(seq.adapter)
        seq.reusable = self.prefix_cache.longest(seq.cache_keys(), seq.prompt, touch=False)[0]
        self.by_id[rid] = seq
        seq.sink(Started(rid, self.scheduler.push(seq)))

    def check_schema(self, schema: str) -> None:
        """Thread-safe: compiles a structured-output schema (cached); raises InvalidRequest when it cannot."""
        self.grammars.compile(schema)

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
                                 self.config.max_lora_rank, self.dtype, next(self._versions),
                                 base_names={self.config.base, str(self.model_dir), self.model_dir.name})

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
        return self.scheduler.has_work() or not self._inbox.empty()

    def call_soon(self, command: Callable[[], None]) -> None:
        """Thread-safe: runs `command` on the engine's thread at the next step boundary."""
        self._inbox.put(command)

    def drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    @torch.no_grad()
    def step(self) -> bool:
        """One forward pass: schedule, run, postprocess. Returns False when there was nothing to do."""
        self.drain_inbox()
        now = time.monotonic()
        for seq in self.scheduler.expired(now):
            self._finish(seq, FinishReason.DEADLINE)
        for seq in self.scheduler.preemptions():
            self.preempted += 1
            self._finish(seq, FinishReason.PREEMPTED)
        plan = self.scheduler.schedule(now)
        if plan is None:
            self.last_batch_size = 0  # idle: the gauge says so, not what the last busy step held
            return False
        started = time.perf_counter()
        logits = self.runner.run(plan)
        sampled, rows = plan.sampled, plan.rows
        if len(sampled) < len(rows):  # rows still prefilling their prompt get no token yet
            logits = logits[sampled]
        for seq, reason in self.postprocessor.process([rows[i] for i in sampled], logits):
            self._finish(seq, reason)
        self.last_batch_size = len(plan.rows)
        self.last_step_s = time.perf_counter() - started
        self.steps += 1
        return True

    def _can_run(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.registry.make_resident(seq.adapter)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self._keep_conversation(seq, reason)
        self.scheduler.remove(seq)
        if seq.adapter is not None:
            self.registry.release(seq.adapter)
        del self.by_id[seq.request_id]
        now = time.monotonic()
        ms = lambda t: (t - seq.arrival) * 1000.0 if t else 0.0  # noqa: E731
        text = seq.detok.text[:seq.detok.emitted]
        seq.sink(Finished(
            request_id=seq.request_id, reason=reason, text=seq.grammar.reply.text if seq.grammar else text,
            json=text if seq.grammar else "",
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated),
            queued_ms=ms(seq.scheduled_at or now), first_token_ms=ms(seq.first_token_at),
            total_ms=ms(now), cached_prompt_tokens=seq.cached, error=error))

    def _keep_conversation(self, seq: Sequence, reason: FinishReason) -> None:
        """A conversation's line, before its slot is freed: its prompt and reply KV go to the prefix cache, for
        the conversation's next line (whose prompt extends this one's with the reply and the new line). One
        copy of at most max_seq_len tokens per line; the entry replaces the conversation's previous one."""
        key = seq.conversation_key()
        if key is None or reason is FinishReason.ERROR or seq not in self.running or seq.kv_len == 0:
            return
        tokens = (seq.prompt + seq.generated)[:seq.kv_len]
        self.prefix_cache.put(key, tuple(tokens), self.kv.read(self.running.index(seq), seq.kv_len))

    def finish_all(self, reason: FinishReason, error: str | None = None, *, waiting: bool = True) -> None:
        """Ends every running (and, with `waiting`, every queued) request: shutdown, or a failed step."""
        for seq in list(self.running) + (self.scheduler.waiting.waiting() if waiting else []):
            self._finish(seq, reason, error)

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
        if self.scheduler.has_work():
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
            return self.runner.score(prompts, [v.slot if v is not None else -1 for v in versions])
        finally:
            for version in distinct:
                self.registry.release(version)

    def _warm_up(self) -> float:
        """One small forward before the first request, so kernels, caches and allocator are warm; its time
        goes into the startup log."""
        start = time.perf_counter()
        self.runner.score([[self.tokenizer.bos_token_id or 0] * 8], [-1])
        return (time.perf_counter() - start) * 1000

    def describe(self) -> dict[str, object]:
        """The resolved fast path, for the startup log and /metrics: what runs, in what dtype, with which kernels."""
        kernels = self.model.kernels()
        return {
            "backend": self.config.backend, "model": str(self.model_dir), "device": str(self.device),
            "cpu": cpu_model_name() if self.device.type == "cpu" else "",
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if self.device.type == "cpu" else "",
            "weights": self.placement.weights, "weights_reason": self.placement.reason,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernels": {**kernels, "lora": f"{kernels['lora']}; adapter stacks in {self.stacks.describe()}"},
            "prefill_policy": self.config.prefill_policy,
            "kernel_build_s": round(self.model.cpu_kernels.build_s, 1) if self.model.cpu_kernels else 0.0,
            "warmup_ms": round(self.warmup_ms, 1),
            # fp32 and the block modes: greedy and seeded text alone equals batched (tests/engine/test_quant.py);
            # bf16 GEMMs of different batch sizes round differently, so a line may change with its companions
            "batch_invariant": self.dtype == torch.float32,
            "threads": torch.get_num_threads() if self.device.type == "cpu" else 0,
            "max_batch_size": self.kv.slots, "max_seq_len": self.max_seq_len,
        }

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=len(self.scheduler.waiting) + self._pending, running=len(self.running),
            max_batch_size=self.kv.slots, adapters_resident=self.registry.resident,
            adapters_known=len(self.registry.current), tokens_generated=self.postprocessor.tokens_generated,
            prompt_tokens=self.runner.prompt_tokens, prefix_cache_hits=self.prefix_cache.hits,
            prefix_cache_misses=self.prefix_cache.misses, steps=self.steps, last_batch_size=self.last_batch_size)


