"""What the daemon tests share: persona files, a daemon on loopback, and event bookkeeping."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc

from npcd.engine.config import EngineConfig
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.service.config import DaemonConfig
from npcd.service.daemon import Daemon, DaemonThread

RPC_TIMEOUT_S = 60


def write_persona(directory: Path, persona_id: str, *, adapter: Path | None = None, system_prompt: str | None = None,
                  display_name: str | None = None, extra: str = "") -> Path:
    path = directory / f"{persona_id}.yaml"
    lines = [
        f"id: {persona_id}",
        f"display_name: {display_name or persona_id.title()}",
        f"description: The {persona_id} of the test village.",
        f"system_prompt: {system_prompt or f'You are the {persona_id}. Answer in one short sentence.'}",
        "sampling: {temperature: 0, max_tokens: 8}",
    ]
    if adapter is not None:
        lines.append(f"adapter: {adapter}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def engine_config(model_dir: Path, **changes) -> EngineConfig:
    base = EngineConfig(base=str(model_dir), weights="fp32", device="cpu", max_batch_size=32, max_seq_len=1024,
                        max_resident_adapters=4, max_queue=128, threads=2)
    return dataclasses.replace(base, **changes)


@contextlib.contextmanager
def running_daemon(personas: Path, engine: EngineConfig, **settings) -> Iterator[tuple[Daemon, npcd_pb2_grpc.NpcdStub]]:
    """A real daemon on a free loopback port and a real gRPC client for it."""
    config = DaemonConfig(listen="127.0.0.1:0", personas=personas, metrics="127.0.0.1:0", grace_s=2.0)
    config = dataclasses.replace(config, **settings)
    with DaemonThread(config, engine) as daemon:
        with grpc.insecure_channel(daemon.address) as channel:
            yield daemon, npcd_pb2_grpc.NpcdStub(channel)


def engine_ids(daemon: Daemon, client_id: str) -> list[str]:
    """Engine-side ids of running requests a client named `client_id` (the server prefixes them)."""
    for _ in range(50):
        try:
            return [k for k in list(daemon.backend.engine.by_id) if k.endswith(":" + client_id)]
        except RuntimeError:  # the engine thread changed the dict while we copied it
            continue
    raise AssertionError("could not read the engine's running requests")


def say(stub: npcd_pb2_grpc.NpcdStub, **fields) -> list[pb.Event]:
    return list(stub.Say(pb.SayRequest(**fields), timeout=RPC_TIMEOUT_S))


def check_stream(events: list[pb.Event], request_id: str) -> pb.Finished:
    """One request's events are Started, TextDelta*, Finished, and the deltas add up to the text."""
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"delta"}, kinds
    assert all(e.request_id == request_id for e in events)
    finished = events[-1].finished
    assert "".join(e.delta.text for e in events[1:-1]) == finished.text
    return finished


def by_request(events: list[pb.Event]) -> dict[str, list[pb.Event]]:
    out: dict[str, list[pb.Event]] = {}
    for event in events:
        out.setdefault(event.request_id, []).append(event)
    return out


class SessionClient:
    """A Session stream whose ticks are sent when the test says so."""

    def __init__(self, stub: npcd_pb2_grpc.NpcdStub, timeout: float = RPC_TIMEOUT_S):
        self._ticks: queue.Queue[pb.Tick | None] = queue.Queue()
        self.call = stub.Session(self._generate(), timeout=timeout)

    def _generate(self) -> Iterator[pb.Tick]:
        while True:
            tick = self._ticks.get()
            if tick is None:
                return
            yield tick

    def send(self, requests: list[pb.SayRequest] = (), cancels: list[str] = (), tick: int = 0) -> None:
        self._ticks.put(pb.Tick(tick=tick, requests=list(requests),
                                cancels=[pb.Cancel(request_id=c) for c in cancels]))

    def close(self) -> None:
        """Half-close: the server ends the stream once what is running has finished."""
        self._ticks.put(None)

    def __iter__(self) -> Iterator[pb.Event]:
        return iter(self.call)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Polls until condition() holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def serve_argv(personas: Path, engine: Path, listen: str = "127.0.0.1:0", *extra: str) -> list[str]:
    """`npcd serve` as a process, configured by flags alone, logging JSON to stderr."""
    return [sys.executable, "-m", "npcd.cli", "serve", "--listen", listen, "--metrics", "0", "--log-json",
            "--personas", str(personas), "--engine", str(engine), *extra]


def serve_env() -> dict[str, str]:
    """No NPCD_* settings leak in (the cache location aside): the flags say everything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPCD_") or k == "NPCD_CACHE"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def spawn_daemon(personas: Path, engine: Path, cwd: Path, *extra: str,
                 timeout_s: float = 180) -> tuple[subprocess.Popen, str, list[dict]]:
    """Starts `npcd serve` on a free loopback port; returns (process, address, its parsed log).

    The log list keeps filling while the daemon runs (a thread drains stderr for its whole life).
    """
    proc = subprocess.Popen(serve_argv(personas, engine, "127.0.0.1:0", *extra), cwd=cwd, env=serve_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[dict] = []
    listening = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": "unparsed", "line": line}
            log.append(entry)
            if entry.get("event") == "listening":
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    if not listening.wait(timeout_s):
        proc.kill()
        proc.wait()
        raise AssertionError("the daemon did not start:\n" + "\n".join(map(str, log[-40:])))
    address = next(e["address"] for e in log if e.get("event") == "listening")
    return proc, address, log
