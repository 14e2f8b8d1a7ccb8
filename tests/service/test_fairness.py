"""A crowded scene over gRPC: player lines start at once while ambient barks fill every slot and the queue."""

from __future__ import annotations

import statistics
import threading
import time

from server_helpers import SessionClient, engine_config, running_daemon, write_persona

from npcd.service._proto import npcd_pb2 as pb


def test_player_lines_start_within_300_ms_during_an_ambient_flood(tmp_path, tiny_model_dir):
    write_persona(tmp_path, "guard")
    engine = engine_config(tiny_model_dir, max_batch_size=4, max_queue=32)
    with running_daemon(tmp_path, engine) as (daemon, stub):
        flood = SessionClient(stub, timeout=120)
        flood.send([pb.SayRequest(request_id=f"bark{i}", persona="guard", line="Grumble.", priority=pb.PRIORITY_AMBIENT,
                                  sampling=pb.SamplingOverrides(max_tokens=400)) for i in range(40)])
        ambient: list[pb.Event] = []
        reader = threading.Thread(target=lambda: ambient.extend(flood), daemon=True)
        reader.start()
        time.sleep(0.5)  # every slot and the ambient part of the queue are taken
        assert daemon.backend.stats().running == 4 and daemon.backend.stats().queue_depth >= 8
        waits, reasons = [], []
        for i in range(8):
            call = stub.Say(pb.SayRequest(request_id=f"player{i}", persona="guard", line="Open the gate!",
                                          priority=pb.PRIORITY_PLAYER, sampling=pb.SamplingOverrides(max_tokens=6)),
                            timeout=60)
            events = list(call)
            assert any(e.HasField("delta") for e in events) and events[-1].HasField("finished")
            waits.append(events[-1].finished.timings.first_token_ms)
            reasons.append(events[-1].finished.reason)
            time.sleep(0.1)
        flood.send(cancels=[f"bark{i}" for i in range(40)])
        flood.close()
        reader.join(timeout=60)
    assert all(r == pb.FINISH_REASON_LENGTH for r in reasons)
    assert max(waits) <= 300, waits  # the p99 of 8 is their max
    shed = [e for e in ambient if e.HasField("finished") and e.finished.reason == pb.FINISH_REASON_PREEMPTED]
    refused = [e for e in ambient if e.HasField("error")]
    assert len(shed) >= 8 and all(e.error.status == "RESOURCE_EXHAUSTED" for e in refused)
    print(f"player first token ms: median {statistics.median(waits):.0f}, max {max(waits):.0f}; "
          f"{len(shed)} barks shed, {len(refused)} refused")


def test_a_client_that_never_reads_cannot_hold_the_engine(tmp_path, tiny_model_dir):
    """Client A floods a Session and never reads it; client B's lines take at most twice their unloaded time:
    B gets its fair share of the slots (A's lines are shed for it), whatever A's backlog."""
    write_persona(tmp_path, "guard")
    engine = engine_config(tiny_model_dir, max_batch_size=4, max_queue=64)
    metadata_b = (("x-npcd-client", "B"),)

    def b_lines() -> list[float]:
        def one(i: int, out: list) -> None:
            events = list(stub.Say(pb.SayRequest(request_id=f"b{i}", persona="guard", line="Report!",
                                                 sampling=pb.SamplingOverrides(max_tokens=60)),
                                   timeout=60, metadata=metadata_b))
            out.append(events[-1].finished.timings.total_ms)
        out: list[float] = []
        threads = [threading.Thread(target=one, args=(i, out)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return out

    with running_daemon(tmp_path, engine) as (daemon, stub):
        b_lines()  # warm
        unloaded = statistics.median(b_lines() + b_lines() + b_lines())  # 6 lines: one slow step skews 2
        ticks = iter([pb.Tick(requests=[pb.SayRequest(request_id=f"a{i}", persona="guard", line="Talk forever.",
                                                      sampling=pb.SamplingOverrides(max_tokens=500))
                                        for i in range(32)])])
        flood = stub.Session(ticks, timeout=120, metadata=(("x-npcd-client", "A"),))  # never read
        time.sleep(0.3)
        assert daemon.backend.stats().running == 4  # A holds every slot
        loaded = statistics.median(b_lines() + b_lines())
        flood.cancel()
    print(f"client B line: unloaded {unloaded:.0f} ms, beside a client that never reads {loaded:.0f} ms")
    assert loaded <= 2 * unloaded, (loaded, unloaded)
