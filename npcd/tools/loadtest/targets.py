"""Where the load goes: the loopback rule, and servers started as subprocesses on free ports.

A load test is a small denial-of-service by design, so it refuses any
address that is not loopback unless the operator says `--allow-remote`.

Servers it starts itself (the daemon, the baseline sidecars) run as separate
processes, never in the load generator's own interpreter: the client's
Python work must not share a GIL with the server under test, and the
servers are all measured the same way.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from npcd.engine.config import EngineConfig
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.tools.loadtest import llamacpp_gguf

READY_POLL_S = 0.25
STOP_TIMEOUT_S = 20.0


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def check_target(address: str, allow_remote: bool) -> None:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ValueError(f"--address must be HOST:PORT, got {address!r}")
    if not allow_remote and not is_loopback(address):
        raise ValueError(f"refusing to load-test {address}: it is not a loopback address "
                         "(pass --allow-remote to send load to another machine)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A gRPC server in a subprocess; entering starts it if needed and waits until it answers ListPersonas,
    leaving stops it (SIGTERM)."""

    def __init__(self, name: str, module_args: list[str], address: str, start_timeout_s: float = 300.0):
        self.name = name
        self.argv = [sys.executable, "-m", *module_args]
        self.address = address
        self.start_timeout_s = start_timeout_s
        self._log = tempfile.NamedTemporaryFile(prefix=f"npcd-loadtest-{name}-", suffix=".log", delete=False)
        self._proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 20) -> str:
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Launches the process without waiting: a slow start (imports, model load) can overlap other work."""
        if self._proc is not None:
            return
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def _wait_ready(self) -> None:
        """Polls ListPersonas on a fresh channel each time: a channel that has failed to connect backs off
        (seconds, growing), which would notice a slow start that much later."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"the {self.name} exited with code {code} before serving; "
                                   f"its log ({self._log.name}) ends:\n{self.log_tail()}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    npcd_pb2_grpc.NpcdStub(channel).ListPersonas(pb.ListPersonasRequest(), timeout=1.0)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {self.name} did not answer on {self.address} within "
                                       f"{self.start_timeout_s:g} s; its log ({self._log.name}) ends:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(READY_POLL_S)

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL if it has not exited in STOP_TIMEOUT_S; the log is kept only when asked."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        if not keep_log:
            Path(self._log.name).unlink(missing_ok=True)

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        self.stop(keep_log=exc_type is not None)


def daemon(personas: Path, engine: Path, metrics: bool = True) -> tuple[ServerProcess, str]:
    """`npcd serve` on free loopback ports; returns it and its metrics URL ("" when off)."""
    address = f"127.0.0.1:{free_port()}"
    metrics_address = f"127.0.0.1:{free_port()}" if metrics else "0"
    args = ["npcd.cli", "serve", "--listen", address, "--metrics", metrics_address, "--personas", str(personas),
            "--engine", str(engine), "--log-level", "warning", "--grace-s", "2"]
    url = f"http://{metrics_address}/metrics" if metrics else ""
    return ServerProcess("daemon", args, address), url


def _nothing_missing() -> str | None:
    return None


@dataclass(frozen=True)
class Baseline:
    """A sidecar the daemon is compared with: same API, one request at a time (`npcd.tools.loadtest.sidecar`)."""

    server: str        # its name in reports, tables and plots
    flag: str          # its flags: --compare-FLAG, --FLAG-loads
    description: str
    module: str        # its `python -m` entry point, which takes the flags of `npcd.cli.naive_sidecar`
    missing: Callable[[], str | None] = _nothing_missing  # why it cannot run here, naming what installs it

    def process(self, personas: Path, engine: EngineConfig) -> ServerProcess:
        """The sidecar on a free loopback port, with the daemon engine's base model, threads and max_seq_len."""
        address = f"127.0.0.1:{free_port()}"
        args = [self.module, "--listen", address, "--personas", str(personas), "--base", engine.base,
                "--threads", str(engine.threads), "--max-seq-len", str(engine.max_seq_len)]
        return ServerProcess(f"{self.server} sidecar", args, address)


BASELINES = (
    Baseline("naive", "naive", "transformers + PEFT, one request at a time, adapter switched per request",
             "npcd.cli.naive_sidecar"),
    Baseline("llama.cpp", "llamacpp", "llama-cpp-python, the bundled Q4_1 GGUF, one request at a time, the persona's "
             "LoRA set per request", "npcd.cli.llamacpp_sidecar", llamacpp_gguf.missing),
)
