"""Assembles a running daemon: engine, personas, gRPC server, metrics; and takes it down cleanly.

`Daemon` is used by `npcd serve` (until SIGTERM / Ctrl-C), by `npcd say --local`
(an in-process daemon on a free loopback port) and by the tests, so all three
run exactly the same wiring.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, Any

from npcd.engine.config import EngineConfig
from npcd.service import logs
from npcd.service.config import DaemonConfig, is_loopback
from npcd.service.conversations import ConversationStore
from npcd.service.metrics import Metrics, MetricsServer
from npcd.service.registry import PersonaRegistry

if TYPE_CHECKING:
    from npcd.service.openai_http import OpenAIServer

HEALTH_POLL_S = 0.5  # how soon gRPC health reflects a failing (or recovered) engine step


class Daemon:
    def __init__(self, config: DaemonConfig, engine_config: EngineConfig | None = None):
        self.config = config
        self.engine_config = engine_config
        self.log: Any = logs.get()
        self.address = ""          # host:port the gRPC server listens on, once started
        self.metrics_address = ""
        self.openai_address = ""   # host:port of the OpenAI-compatible HTTP endpoint; "" while it is off
        self.backend: Any = None
        self.registry: PersonaRegistry | None = None
        self._server: Any = None
        self._health: Any = None
        self._servicer: Any = None
        self._metrics_server: MetricsServer | None = None
        self._openai: OpenAIServer | None = None
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        from npcd.engine.async_engine import (
            AsyncEngine,  # torch: only imported by commands that run a model
        )
        from npcd.service.servicer import NpcdServicer, start_server

        config = self.config
        config.validate("daemon config")
        if not config.personas.is_dir():
            raise FileNotFoundError(f"personas directory {config.personas} does not exist")
        engine_config = self.engine_config or EngineConfig.from_yaml(config.engine)
        self.backend = await asyncio.to_thread(AsyncEngine, engine_config)
        self.backend.start()
        self.registry = PersonaRegistry(self.backend, config.personas, log=self.log)
        await asyncio.to_thread(self.registry.reload)
        self.registry.start_watching()
        metrics = Metrics(self.backend.stats, self.backend.describe())
        limits = config.limits
        conversations = ConversationStore(config.conversations, max_turns=limits.max_conversation_turns,
                                          max_conversations=limits.max_conversations,
                                          max_text_chars=limits.max_line_chars, max_name_chars=limits.max_id_chars)
        self._servicer = NpcdServicer(self.backend, self.registry, config.limits, metrics,
                                      tick_window_s=config.tick_window_ms / 1000.0, log=self.log,
                                      admin=config.admin, reload_interval_s=config.reload_min_interval_s,
                                      sentence_marks=config.sentence_marks, clause_marks=config.clause_marks,
                                      conversations=conversations)
        self._server, port, self._health = await start_server(self._servicer, config)
        if config.insecure_lan and not is_loopback(config.listen.rpartition(":")[0]):
            self.log.warning("serving beyond loopback without the protection insecure_lan waives: anyone who can "
                             "reach the port can use it", listen=config.listen, tls=config.tls_cert is not None,
                             token=bool(config.token))
        self.address = f"{config.listen.rpartition(':')[0]}:{port}"
        if config.metrics_enabled:
            self._metrics_server = MetricsServer(metrics, config.metrics)
            self._metrics_server.start()
            self.metrics_address = self._metrics_server.address
        if config.openai_enabled:
            from npcd.service.openai_http import OpenAIServer  # starlette and uvicorn only when it is on

            self._openai = OpenAIServer(self._servicer, self.registry, config, self.log)
            self.openai_address = await self._openai.start()
            if config.insecure_lan and not is_loopback(config.openai_listen.rpartition(":")[0]):
                self.log.warning("the OpenAI endpoint serves beyond loopback without the protection insecure_lan "
                                 "waives", openai_listen=config.openai_listen, tls=config.tls_cert is not None,
                                 token=bool(config.token))
        self._health_task = asyncio.create_task(self._follow_engine_health())
        states = self.registry.states()
        self.log.info("listening", address=self.address, metrics=self.metrics_address or "off",
                      openai=self.openai_address or "off",
                      conversations=str(config.conversations) if config.conversations else "memory only",
                      tls=config.tls_cert is not None, mutual_tls=config.tls_client_ca is not None,
                      token=bool(config.token), reflection=config.reflection, admin=config.admin,
                      personas=str(config.personas), personas_ready=sum(s.persona is not None for s in states),
                      personas_failed=sum(s.persona is None for s in states), **self.backend.describe())

    async def _follow_engine_health(self) -> None:
        """gRPC health says NOT_SERVING while the engine's last step failed, SERVING once one succeeds."""
        from npcd.service.servicer import set_serving

        serving = True
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            healthy = not self.backend.stats().last_error
            if healthy != serving and self._health is not None:
                serving = healthy
                await set_serving(self._health, serving)

    async def stop(self) -> None:
        """Stop admitting, let in-flight lines finish (or cancel them after the grace period), close."""
        self.log.info("shutting down", grace_s=self.config.grace_s)
        if self._health_task is not None:
            self._health_task.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._servicer is not None:
            await self._servicer.drain(self.config.grace_s)
        # The HTTP door closes after the drain, like the gRPC server: until then its requests are refused with
        # 503 (the servicer is not admitting), and its streams get their lines' last chunks and [DONE].
        if self._openai is not None:
            await self._openai.stop()
        if self._server is not None:
            await self._server.stop(1.0)
        if self._servicer is not None:
            await self._servicer.close()
        if self.registry is not None:
            self.registry.stop_watching()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.shutdown, 1.0)
        self.log.info("stopped")


async def serve(config: DaemonConfig) -> int:
    """Run until SIGTERM or Ctrl-C; exit code 0 after a clean shutdown."""
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        await stop.wait()
    finally:
        await daemon.stop()
    return 0


class DaemonThread:
    """A daemon on its own event-loop thread, for in-process use (`npcd say --local`, tests).

    Used as a context manager: entering starts it (the address is then in
    `.address`), leaving stops it the same way SIGTERM would.
    """

    def __init__(self, config: DaemonConfig, engine_config: EngineConfig | None = None, start_timeout_s: float = 300):
        self.daemon = Daemon(config, engine_config)
        self._timeout = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="npcd-daemon", daemon=True)

    def __enter__(self) -> Daemon:
        self._thread.start()
        try:
            self.run(self.daemon.start(), self._timeout)
        except BaseException:
            self.__exit__()
            raise
        return self.daemon

    def run(self, coro: Any, timeout: float) -> Any:
        """Runs a coroutine on the daemon's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.daemon.stop(), self.daemon.config.grace_s + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
