"""Player lines first for real: they never wait for a slot behind ambient lines, and keep queue places."""

from __future__ import annotations

import pytest

from npcd.engine.api import Finished, FinishReason, GenerationRequest, QueueFull, SamplingParams
from npcd.engine.engine import Engine


def line(rid: str, priority: int, tokens: int = 200) -> GenerationRequest:
    return GenerationRequest(rid, [1, 2, 3, 4], SamplingParams(max_tokens=tokens, ignore_eos=True),
                             priority=priority)


def test_a_player_line_sheds_the_ambient_line_with_least_text(tiny_config):
    engine = Engine(tiny_config.replace(max_batch_size=2))
    events: dict[str, list] = {}
    sink = lambda e: events.setdefault(e.request_id, []).append(e)  # noqa: E731
    engine.submit(line("old", 0), sink)
    for _ in range(5):
        engine.step()
    engine.submit(line("young", 0), sink)
    engine.step()
    engine.step()
    engine.submit(line("player", 1, tokens=4), sink)
    engine.step()
    assert [s.request_id for s in engine.running] == ["old", "player"]
    shed = events["young"][-1]
    assert isinstance(shed, Finished) and shed.reason is FinishReason.PREEMPTED and shed.completion_tokens == 2
    while engine.has_work() and "player" in engine.by_id:
        engine.step()
    assert events["player"][-1].reason is FinishReason.LENGTH and "old" in engine.by_id  # the older bark goes on
    assert engine.preempted == 1


def test_a_player_line_never_sheds_another_player_line(tiny_config):
    engine = Engine(tiny_config.replace(max_batch_size=1))
    engine.submit(line("p1", 1), lambda e: None)
    engine.step()
    engine.submit(line("p2", 1), lambda e: None)
    engine.step()
    assert [s.request_id for s in engine.running] == ["p1"] and engine.preempted == 0


def test_a_full_queue_makes_room_for_another_client(tiny_config):
    """A client that filled the queue alone gives its newest place up to another client's line."""
    engine = Engine(tiny_config.replace(max_batch_size=1, max_queue=4, player_queue_share=0))
    events: dict[str, list] = {}
    sink = lambda e: events.setdefault(e.request_id, []).append(e)  # noqa: E731

    def of(client: str, rid: str) -> GenerationRequest:
        return GenerationRequest(rid, [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), client=client)
    engine.submit(of("A", "a-run"), sink)
    engine.step()
    for i in range(4):
        engine.submit(of("A", f"a{i}"), sink)
    engine.step()
    with pytest.raises(QueueFull):  # a lone client meets the queue's end
        engine.submit(of("A", "a4"), sink)
    engine.submit(of("B", "b0"), sink)  # another client: A holds 4 places of a share of 2
    engine.step()
    assert events["a3"][-1].reason is FinishReason.PREEMPTED  # A's newest gave its place up
    assert [w.request_id for w in engine.scheduler.waiting.waiting()] == ["a0", "a1", "a2", "b0"]
    engine.submit(of("B", "b1"), sink)
    engine.step()
    assert events["a2"][-1].reason is FinishReason.PREEMPTED
    with pytest.raises(QueueFull):  # now both hold their share: the queue is simply full
        engine.submit(of("B", "b2"), sink)


def test_ambient_requests_leave_queue_places_for_player_lines(tiny_config):
    engine = Engine(tiny_config.replace(max_batch_size=1, max_queue=8, player_queue_share=0.25))
    for i in range(6):
        engine.submit(line(f"a{i}", 0), lambda e: None)
    with pytest.raises(QueueFull, match=r"queue is full \(6 waiting, the rest kept for player lines\)"):
        engine.submit(line("a6", 0), lambda e: None)
    engine.submit(line("p0", 1), lambda e: None)
    engine.submit(line("p1", 1), lambda e: None)
    with pytest.raises(QueueFull, match=r"queue is full \(8 waiting\)"):
        engine.submit(line("p2", 1), lambda e: None)
