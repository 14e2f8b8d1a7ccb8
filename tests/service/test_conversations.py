"""Conversations the daemon keeps: never refused for length, the prefix reused, saved, restored, exported."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import grpc
import pytest
from server_helpers import RPC_TIMEOUT_S, engine_config, running_daemon, say

from npcd.service._proto import npcd_pb2 as pb
from npcd.service.conversations import BLOB_MAGIC

PERSONAS = Path(__file__).resolve().parents[2] / "personas"
pytestmark = pytest.mark.slow  # the real model and the shipped personas
TOPICS = ["gate", "road", "king", "tavern", "river", "market", "bridge", "tower"]


def real_engine(real_model_dir: Path):
    """The shipped engine's weights mode (int4 on a CPU with the block kernel): TTFT as a game would see it."""
    return engine_config(real_model_dir, weights="auto", max_batch_size=4, max_seq_len=1024)


def finished(events: list[pb.Event]) -> pb.Finished:
    assert events[-1].HasField("finished"), events[-1]
    return events[-1].finished


def line(stub, conversation: str, text: str, persona: str = "town_guard", max_tokens: int = 16,
         metadata=(), **fields) -> pb.Finished:
    return finished(list(stub.Say(pb.SayRequest(
        persona=persona, conversation=conversation, line=text, priority=pb.PRIORITY_PLAYER,
        sampling=pb.SamplingOverrides(temperature=0, max_tokens=max_tokens), **fields),
        timeout=RPC_TIMEOUT_S, metadata=metadata)))


def ref(conversation: str, persona: str = "town_guard") -> pb.ConversationRef:
    return pb.ConversationRef(conversation=conversation, persona=persona)


@pytest.fixture(scope="module")
def served(tmp_path_factory, real_model_dir):
    db = tmp_path_factory.mktemp("db") / "conversations.sqlite3"
    with running_daemon(PERSONAS, real_engine(real_model_dir), conversations=db) as (daemon, stub):
        yield daemon, stub, db


def test_a_40_turn_conversation_is_never_refused_and_reuses_its_prefix_every_line(served):
    _, stub, _ = served
    say(stub, persona="town_guard", line="Good day.")  # the persona's system turn is cached, as in a running game

    def asking(i: int) -> str:
        return f"Tell me about the {TOPICS[i % len(TOPICS)]}, guard. What do you know of it, and who keeps it?"
    results, first_lines = [], []
    for i in range(40):
        results.append(line(stub, "long-watch", asking(i)))
        if i >= 30:  # a turn 1 beside each of the last ten turns: the same machine load, the same background work
            first_lines.append(line(stub, f"new-watch-{i}", asking(i)))
    budget = 1024 - 16
    assert all(r.prompt_tokens <= budget for r in results)
    assert max(r.prompt_tokens for r in results) > budget * 0.7  # it did fill the window
    assert results[0].history_turns == 0 and max(r.history_turns for r in results) >= 20
    # no line waits for its whole window to be computed again: the window moves in the background (a few
    # exchanges at a time, to half the budget), and every line reuses all of its prompt but the newest turns
    moved = [i for i, r in enumerate(results[1:], 1) if r.history_turns < results[i - 1].history_turns]
    assert 2 <= len(moved) <= 8, moved
    # A line computes its own new turns (one exchange's worth of prompt growth); the line right after a window
    # move also the exchange that finished while the moved window was prefilled in the background. Bounded by
    # the prompt's growth per line, not a token count: the answers' lengths differ between CPUs (the kernels'
    # rounding picks other greedy tokens), and a lost reuse recomputes the whole ~600-token window.
    growth = statistics.median(results[i].prompt_tokens - results[i - 1].prompt_tokens
                               for i in range(1, len(results)) if i not in moved)
    assert all(r.prompt_tokens - r.cached_prompt_tokens <= 3 * growth for r in results[1:]), (growth, [
        (r.prompt_tokens, r.cached_prompt_tokens) for r in results])
    ttft = [r.timings.first_token_ms for r in results]
    # Medians of ten. The turns 1 are measured between the last ten turns, so a load that drifts over the test's
    # minute moves both (turns 1-10 against 31-40 measured 1.04x-1.52x between runs on the 2-core AVX2 CPU), and
    # they give the background window the time a player's reading gives it: back to back (turns 16-31), the line
    # after a window switch computed one exchange more and took ~2x. What grows with the ~700 reused tokens is
    # the attention over them and their KV copy into the slot: 1.31x-1.37x in four runs there.
    first, last = statistics.median(r.timings.first_token_ms for r in first_lines), statistics.median(ttft[30:])
    print(f"first-token ms: turn 1 median {first:.0f} (turns 1-10 {statistics.median(ttft[:10]):.0f}), turns "
          f"31-40 median {last:.0f}; window moves at turns {[i + 1 for i in moved]}: "
          f"{[round(ttft[i]) for i in moved]} ms; all: {[round(t) for t in ttft]}")
    assert all(r.history_turns == 0 for r in first_lines)
    assert last <= 1.5 * first, (first, last, [round(t) for t in ttft])
    kept = stub.GetConversation(ref("long-watch"), timeout=RPC_TIMEOUT_S)
    assert len(kept.turns) == 80 and not kept.summary  # every turn is stored; town_guard drops, never summarises
    assert [t.npc for t in kept.turns[:4]] == [False, True, False, True]
    assert kept.turns[1].text == results[0].text and kept.turns[0].speaker == "Player"


def test_a_summarising_persona_folds_the_turns_that_left_into_its_own_summary(served):
    _, stub, _ = served
    long_line = ("I walked the whole northern road today, past the burned mill and the old stones, and a merchant "
                 "named Brannoc told me the king's soldiers are coming back to the Greywood with torches. ")
    held = []
    for i in range(20):  # until the window moves: 20 of these lines are far more than one prompt holds
        held.append(line(stub, "elf-memory", f"{long_line}Day {i + 1}: what should I do?", persona="forest_elf",
                         max_tokens=40).history_turns)
        if len(held) > 1 and held[-1] < held[-2]:
            break
    assert held[-1] < held[-2], held
    deadline = time.monotonic() + 120
    while True:
        conv = stub.GetConversation(ref("elf-memory", "forest_elf"), timeout=RPC_TIMEOUT_S)
        if conv.summary or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert conv.summary and conv.summarized_turns >= 2, conv
    after = line(stub, "elf-memory", "Remind me what I told you.", persona="forest_elf")
    assert after.text and after.history_turns < len(conv.turns)


def test_history_that_does_not_fit_is_trimmed_and_a_line_that_cannot_fit_names_the_field(served):
    _, stub, _ = served
    words = " ".join(["the old road runs north past the mill and the river to the gate of the town"] * 18)  # 306 words
    history = [pb.Turn(speaker="Player" if i % 2 == 0 else "Guard", text=words) for i in range(8)]
    f = finished(say(stub, persona="town_guard", line="And then?", history=history,
                     sampling=pb.SamplingOverrides(temperature=0, max_tokens=8)))
    assert 0 < f.history_turns < 8 and f.prompt_tokens <= 1024 - 8  # the newest turns, not a refusal
    with pytest.raises(grpc.RpcError) as refused:
        say(stub, persona="town_guard", request_id="huge", line="龍" * 2000)  # ~2 tokens per character
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = refused.value.details()
    assert message.startswith("line: ") and "town_guard" in message and "say" not in message.split("'")[0], message
    with pytest.raises(grpc.RpcError) as refused:
        say(stub, persona="town_guard", line="Hi", context={f"k{i}": "龍" * 2000 for i in range(4)})
    assert refused.value.details().startswith("context: "), refused.value.details()


def test_turns_others_said_and_edits_are_part_of_the_conversation(served):
    _, stub, _ = served
    added = stub.AddTurns(pb.AddTurnsRequest(ref=ref("square"), turns=[
        pb.ConversationTurn(speaker="Mira", text="The bridge is out again."),
        pb.ConversationTurn(speaker="Player", text="Did you hear that?")]), timeout=RPC_TIMEOUT_S)
    assert [t.speaker for t in added.turns] == ["Mira", "Player"]
    f = line(stub, "square", "So what now?", history=[pb.Turn(speaker="Mira", text="Someone must fix it.")])
    assert f.history_turns == 3  # the two heard turns and the one sent with the line
    conv = stub.GetConversation(ref("square"), timeout=RPC_TIMEOUT_S)
    assert [t.text for t in conv.turns[:4]] == ["The bridge is out again.", "Did you hear that?",
                                                 "Someone must fix it.", "So what now?"]
    assert conv.turns[-1].npc and conv.turns[-1].text == f.text
    edited = stub.SetConversation(pb.Conversation(conversation="square", persona="town_guard", summary="Mira is worried.",
                                                  turns=conv.turns[:2]), timeout=RPC_TIMEOUT_S)
    assert len(edited.turns) == 2 and edited.summary == "Mira is worried."
    assert line(stub, "square", "Anything else?").history_turns == 2
    other = (("x-npcd-client", "another-game"),)
    assert not stub.GetConversation(ref("square"), timeout=RPC_TIMEOUT_S, metadata=other).turns  # per client
    stub.ResetConversation(ref("square"), timeout=RPC_TIMEOUT_S)
    assert not stub.GetConversation(ref("square"), timeout=RPC_TIMEOUT_S).turns
    for call, request, field in [
        (stub.AddTurns, pb.AddTurnsRequest(ref=ref("square", "nobody")), "persona"),
        (stub.AddTurns, pb.AddTurnsRequest(ref=ref("bad\nname")), "conversation"),
        (stub.AddTurns, pb.AddTurnsRequest(ref=ref("square"), turns=[pb.ConversationTurn(speaker="", text="x")]),
         "turns[0].speaker"),
        (stub.GetConversation, ref(""), "conversation"),
    ]:
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=RPC_TIMEOUT_S)
        assert field in refused.value.details() and refused.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), refused.value.details()


def test_export_import_round_trip_and_a_bad_blob_changes_nothing(served):
    _, stub, _ = served
    game = (("x-npcd-client", "save-test"),)
    for i in range(3):
        line(stub, f"npc-{i}", f"Hello number {i}.", metadata=game)
    before = [stub.GetConversation(ref(f"npc-{i}"), timeout=RPC_TIMEOUT_S, metadata=game) for i in range(3)]
    blob = stub.ExportConversations(pb.ExportConversationsRequest(), timeout=RPC_TIMEOUT_S, metadata=game)
    assert blob.conversations == 3 and blob.data.startswith(BLOB_MAGIC)
    stub.ResetConversation(ref("npc-0"), timeout=RPC_TIMEOUT_S, metadata=game)
    line(stub, "npc-9", "I am new.", metadata=game)
    for bad in (blob.data[:-5], blob.data[:40] + bytes([blob.data[40] ^ 0xFF]) + blob.data[41:], b"PK\x03\x04zip",
                BLOB_MAGIC + b"\x07" + blob.data[len(BLOB_MAGIC) + 1:]):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ImportConversations(pb.ImportConversationsRequest(data=bad, replace=True), timeout=RPC_TIMEOUT_S,
                                     metadata=game)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "data" in refused.value.details()
    assert stub.GetConversation(ref("npc-9"), timeout=RPC_TIMEOUT_S, metadata=game).turns  # nothing was lost
    imported = stub.ImportConversations(pb.ImportConversationsRequest(data=blob.data, replace=True),
                                        timeout=RPC_TIMEOUT_S, metadata=game)
    assert imported.conversations == 3
    after = [stub.GetConversation(ref(f"npc-{i}"), timeout=RPC_TIMEOUT_S, metadata=game) for i in range(3)]
    assert after == before
    assert not stub.GetConversation(ref("npc-9"), timeout=RPC_TIMEOUT_S, metadata=game).turns  # replace: the save's
    listed = stub.ListConversations(pb.ListConversationsRequest(), timeout=RPC_TIMEOUT_S, metadata=game)
    assert sorted(c.conversation for c in listed.conversations) == ["npc-0", "npc-1", "npc-2"]


def test_conversations_survive_a_restart(tmp_path, real_model_dir):
    db = tmp_path / "conversations.sqlite3"
    engine = dataclasses.replace(real_engine(real_model_dir), max_batch_size=2)
    with running_daemon(PERSONAS, engine, conversations=db) as (_, stub):
        for text in ("Halt! Who goes there?", "I am a traveller.", "May I pass?"):
            line(stub, "gate-guard", text)
        before = stub.GetConversation(ref("gate-guard"), timeout=RPC_TIMEOUT_S)
    with running_daemon(PERSONAS, engine, conversations=db) as (_, stub):
        assert stub.GetConversation(ref("gate-guard"), timeout=RPC_TIMEOUT_S) == before
        assert line(stub, "gate-guard", "Thank you.").history_turns == 6
        assert len(stub.GetConversation(ref("gate-guard"), timeout=RPC_TIMEOUT_S).turns) == 8
