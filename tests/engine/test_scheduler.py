"""Admission: priority order, free slots, and the prefill token budget counted in real (packed) tokens;
chunked prefill through a real engine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from npcd.engine.api import BACKGROUND_PRIORITY, GenerationRequest, SamplingParams, TextDelta
from npcd.engine.engine import Engine
from npcd.engine.kernels import why_unavailable
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
    # 60 + 30, then c starts with the budget's last 10 tokens (its first chunk); d waits
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["a", "b", "c"]
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["d"]
    assert len(s) == 0
    assert s.admit(8, 0, lambda i: True) == []


def test_an_oversized_prompt_starts_in_chunks_and_players_go_first():
    s: WaitingQueue[Item] = WaitingQueue(max_queue=8)
    s.push(Item("long", 500))
    s.push(Item("player", 10, priority=1))
    assert [i.name for i in s.admit(8, 100, lambda i: True)] == ["player", "long"]


def test_free_slots_and_unrunnable_items():
    s: WaitingQueue[Item] = WaitingQueue(max_queue=8)
    for name in "abc":
        s.push(Item(name, 10))
    assert [i.name for i in s.admit(2, 1000, lambda i: i.name != "a")] == ["b", "c"]
    assert [i.name for i in s.admit(2, 1000, lambda i: True)] == ["a"]


needs_kernel = pytest.mark.skipif(why_unavailable() is not None, reason=f"CPU kernels: {why_unavailable()}")


@needs_kernel
def test_a_long_prompt_is_prefilled_in_chunks_while_a_line_keeps_decoding(tiny_config):
    """Budget 32: a 200-token history (with a 40-token persona prefix) takes 7 steps of prompt work, the
    running line gets a token in every one of them, and both texts equal what each gives alone. int4
    weights: every operator of a row is independent of its step's other rows, so they are exactly equal."""
    engine = Engine(tiny_config.replace(weights="int4", prefill_token_budget=32))
    history = [(7 * i) % 900 + 20 for i in range(200)]
    long_req = lambda rid: GenerationRequest(rid, history, SamplingParams(max_tokens=6, temperature=0.0),  # noqa: E731
                                             prefix_len=40)
    short_req = lambda rid: GenerationRequest(rid, [5, 6, 7, 8], SamplingParams(max_tokens=30, temperature=0.0,  # noqa: E731
                                                                                 ignore_eos=True))
    alone = {r.request_id[:-1]: r.text for r in (engine.generate([long_req("longA")])[0],
                                                 engine.generate([short_req("shortA")])[0])}
    engine.prefix_cache.drop_version(None)  # the long prompt's prefix must be computed again, in chunks

    events: dict[str, list] = {"long": [], "short": []}
    engine.submit(short_req("short"), events["short"].append)
    engine.step()                          # the short line's prompt; it decodes from the next step on
    engine.submit(long_req("long"), events["long"].append)
    prompt_work, short_tokens = [], []
    while engine.has_work():
        before, generated = engine.runner.prompt_tokens, len(engine.by_id["short"].generated) \
            if "short" in engine.by_id else None
        engine.step()
        prompt_work.append(engine.runner.prompt_tokens - before)
        if generated is not None and "short" in engine.by_id:
            short_tokens.append(len(engine.by_id["short"].generated) - generated)
    chunked = [w for w in prompt_work if w]
    assert chunked == [32] * 6 + [8], prompt_work          # 200 tokens in chunks of at most one budget
    assert all(t == 1 for t in short_tokens[:len(chunked)])  # the running line never waited for the prompt
    texts = {name: "".join(e.text for e in evs if isinstance(e, TextDelta)) for name, evs in events.items()}
    assert texts == {"long": alone["long"], "short": alone["short"]}
    assert (None, tuple(history[:40])) in engine.prefix_cache  # stored once its chunk was done


def test_the_daemons_own_prompts_take_small_chunks_and_none_beside_a_player_prompt(tiny_config):
    """Budget 64 (share 8): a background prompt (a conversation's next window) computes at most 8 tokens a step,
    alone or in what an ambient line's prompt leaves, and nothing in the step that computes a player line's
    prompt, so the player's first token waits for one small step at most; it goes on while the player decodes."""
    engine = Engine(tiny_config.replace(prefill_token_budget=64))
    background = GenerationRequest("bg", [(3 * i) % 900 + 20 for i in range(200)],
                                   SamplingParams(max_tokens=1, temperature=0.0), priority=BACKGROUND_PRIORITY)
    engine.submit(background, lambda event: None)

    def step_tokens() -> dict[str, int]:
        before = {rid: seq.kv_len for rid, seq in engine.by_id.items()}
        engine.step()
        return {rid: seq.kv_len - before.get(rid, 0) for rid, seq in engine.by_id.items()}

    assert [step_tokens()["bg"] for _ in range(3)] == [8, 8, 8]
    engine.submit(GenerationRequest("bark", list(range(30, 70)), SamplingParams(max_tokens=2, temperature=0.0)),
                  lambda event: None)
    beside_ambient = step_tokens()
    assert beside_ambient == {"bg": 8, "bark": 40}, beside_ambient  # the ambient line's prompt first
    engine.submit(GenerationRequest("player", list(range(40, 60)), SamplingParams(max_tokens=6, temperature=0.0,
                                                                                  ignore_eos=True), priority=1),
                  lambda event: None)
    player_prompt = step_tokens()
    assert player_prompt["player"] == 20 and player_prompt["bg"] == 0, player_prompt
    while "player" in engine.by_id:
        decoding = step_tokens()
        if "player" in decoding and "bg" in decoding:
            assert decoding["player"] == 1 and 0 < decoding["bg"] <= 8, decoding
    assert engine.by_id["bg"].kv_len > 24 + 8
