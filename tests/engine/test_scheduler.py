"""Admission: priority order, free slots, and the prefill token budget counted in real (packed) tokens."""

from __future__ import annotations

from dataclasses import dataclass

from npcd.engine.scheduler import WaitingQueue


@dataclass(eq=False)
class Item:
    name: str
    prefill_tokens: int
    priority: int = 0
    done: bool = False


def test_budget_counts_the_sum_of_prompt_tokens_and_keeps_the_rest_in_order():
    s: WaitingQueue[Item] = WaitingQueue(max_queue=8)
    for item in (Item("a", 60), Item("b", 30), Item("c", 20), Item("d", 5)):
        s.push(item)
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["a", "b"]  # 60 + 30; c would make 110
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["c", "d"]
    assert len(s) == 0


def test_an_oversized_prompt_still_runs_alone_and_players_go_first():
    s: WaitingQueue[Item] = WaitingQueue(max_queue=8)
    s.push(Item("long", 500))
    s.push(Item("player", 10, priority=1))
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["player"]
    assert [i.name for i in s.admit(1, 100, lambda i: True)] == ["long"]


def test_free_slots_and_unrunnable_items():
    s: WaitingQueue[Item] = WaitingQueue(max_queue=8)
    for name in "abc":
        s.push(Item(name, 10))
    assert [i.name for i in s.admit(2, 1000, lambda i: i.name != "a")] == ["b", "c"]
    assert [i.name for i in s.admit(2, 1000, lambda i: True)] == ["a"]
