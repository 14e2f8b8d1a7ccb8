"""A failing engine step: the running lines end with an error, the traceback is logged once, health says so."""

from __future__ import annotations

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import engine_config, running_daemon, say, wait_for, write_persona

from npcd.service._proto import npcd_pb2 as pb


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="npcd.v1.Npcd"), timeout=10).status


def test_failing_step_is_logged_once_fails_the_line_and_flips_health(tmp_path, tiny_model_dir, monkeypatch):
    write_persona(tmp_path, "plain")
    with running_daemon(tmp_path, engine_config(tiny_model_dir), metrics="0") as (daemon, stub):
        runner = daemon.backend.engine.runner
        real_run = runner.run

        def broken(plan):  # fault injection: a bug inside the forward pass
            raise RuntimeError("simulated kernel fault")

        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(runner, "run", broken)
            for _ in range(2):  # the same fault twice: one traceback, two failed steps
                events = say(stub, request_id="x", persona="plain", line="Hello?")
                assert events[-1].WhichOneof("kind") == "error"
                assert "simulated kernel fault" in events[-1].error.message
            stats = daemon.backend.stats()
            assert stats.step_failures == 2 and "simulated kernel fault" in stats.last_error
            wait_for(lambda: _health(daemon.address) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                     "health to report the failing engine")
            monkeypatch.setattr(runner, "run", real_run)
            events = say(stub, request_id="y", persona="plain", line="Hello?")
            assert events[-1].finished.reason == pb.FINISH_REASON_LENGTH
        failures = [e for e in logs if e["event"].startswith("engine step failed")]
        assert len(failures) == 1 and failures[0]["log_level"] == "error"
        assert daemon.backend.stats().last_error == ""
        wait_for(lambda: _health(daemon.address) == health_pb2.HealthCheckResponse.SERVING, 5,
                 "health to recover after a good step")

