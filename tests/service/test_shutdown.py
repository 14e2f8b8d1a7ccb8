"""`npcd serve` as a real process: SIGTERM while lines stream ends them with Finished and exits 0."""

from __future__ import annotations

import signal
import subprocess
import time

import grpc
import pytest
from server_helpers import SessionClient, check_stream, spawn_daemon, write_persona

from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc

pytestmark = pytest.mark.slow  # starts subprocesses

def start_daemon(tmp_path, tiny_model_dir, *extra: str) -> tuple[subprocess.Popen, str, list[dict]]:
    personas = tmp_path / "personas"
    personas.mkdir()
    write_persona(personas, "plain")
    engine = tmp_path / "engine.yaml"
    engine.write_text(f"base: {tiny_model_dir}\nweights: fp32\ndevice: cpu\nmax_batch_size: 8\n"
                      "max_seq_len: 1024\nthreads: 2\n")
    # No npcd.yaml in tmp_path: everything comes from the flags.
    return spawn_daemon(personas, engine, tmp_path, *extra)


def test_sigterm_finishes_in_flight_streams_and_exits_zero(tmp_path, tiny_model_dir):
    proc, address, log = start_daemon(tmp_path, tiny_model_dir, "--grace-s", "0.5")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = npcd_pb2_grpc.NpcdStub(channel)
            say_call = stub.Say(pb.SayRequest(request_id="say", persona="plain", line="Talk.",
                                              sampling=pb.SamplingOverrides(max_tokens=500)), timeout=60)
            say_events = iter(say_call)
            said = [next(say_events), next(say_events)]  # started, and the first delta: it is streaming
            session = SessionClient(stub)
            session.send([pb.SayRequest(request_id="tick", persona="plain", line="Talk too.",
                                        sampling=pb.SamplingOverrides(max_tokens=500))])
            session_events = iter(session)
            heard = [next(session_events), next(session_events)]
            assert [e.WhichOneof("kind") for e in said + heard] == ["started", "delta"] * 2

            proc.send_signal(signal.SIGTERM)
            said += list(say_events)      # the streams end by themselves, with status OK
            heard += list(session_events)
            for events, rid in ((said, "say"), (heard, "tick")):
                finished = check_stream(events, rid)
                assert finished.reason == pb.FINISH_REASON_CANCELLED  # 500 tokens outlast a 0.5 s grace
                assert 0 < finished.completion_tokens < 500
            assert say_call.code() == grpc.StatusCode.OK
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = [e.get("event") for e in log]
    assert events.index("listening") < events.index("shutting down") < events.index("stopped")


def test_sigterm_lets_short_lines_finish_within_the_grace_period(tmp_path, tiny_model_dir):
    proc, address, _ = start_daemon(tmp_path, tiny_model_dir, "--grace-s", "20")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = npcd_pb2_grpc.NpcdStub(channel)
            call = stub.Say(pb.SayRequest(request_id="short", persona="plain", line="Hi",
                                          sampling=pb.SamplingOverrides(max_tokens=200)), timeout=60)
            events = iter(call)
            got = [next(events)]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            try:  # new work is refused while the daemon drains
                list(stub.Say(pb.SayRequest(request_id="new", persona="plain", line="Hi"), timeout=10))
                refused = None
            except grpc.RpcError as exc:
                refused = exc.code()
            assert refused == grpc.StatusCode.UNAVAILABLE
            got += list(events)
            assert check_stream(got, "short").reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
