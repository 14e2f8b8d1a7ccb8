"""Structured lines over gRPC: the spoken line streams, Emotion and Action follow, refusals name the field."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest
from server_helpers import SessionClient, by_request, engine_config, running_daemon, say, write_persona

from npcd.service._proto import npcd_pb2 as pb

TRADER = """\
emotions: [calm, greedy, annoyed]
actions:
  - name: sell
    description: sell an item
    args:
      type: object
      properties:
        item: {enum: [rope, sword]}
        price: {type: integer, minimum: 1, maximum: 1000}
  - name: none
    description: just talk
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_adapters):
    directory = tmp_path_factory.mktemp("personas")
    write_persona(directory, "trader", adapter=tiny_adapters["merchant"], extra=TRADER)
    write_persona(directory, "plain")
    write_persona(directory, "broken", extra="actions:\n  - name: sell\n    args:\n      type: object\n"
                                             "      properties: {code: {type: string, pattern: '(('}}\n")
    with running_daemon(directory, engine_config(tiny_model_dir)) as (daemon, stub):
        yield daemon, stub


def structured_line(events: list[pb.Event]) -> pb.Finished:
    """Started, TextDelta*, Emotion, Action, Finished; the deltas are the line and the events match the JSON."""
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert kinds[-3:-1] == ["emotion", "action"] and set(kinds[1:-3]) <= {"delta"}, kinds
    finished = events[-1].finished
    reply = json.loads(finished.json)
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == finished.text == reply["say"]
    assert events[-3].emotion.label == finished.emotion.label == reply["emotion"]
    assert events[-2].action == finished.action and finished.action.name == reply["action"]["name"]
    assert json.loads(finished.action.args_json) == reply["action"].get("args", {})
    return finished


def test_say_structured_streams_the_line_then_emotion_and_action(served):
    _, stub = served
    finished = structured_line(say(stub, request_id="a", persona="trader", line="A rope, please.", structured=True,
                                   sampling=pb.SamplingOverrides(temperature=1.0, seed=3, max_tokens=10)))
    assert finished.emotion.label in {"calm", "greedy", "annoyed"}
    assert finished.action.name in {"sell", "none"}
    if finished.action.name == "sell":
        assert json.loads(finished.action.args_json)["item"] in {"rope", "sword"}


def test_actions_valid_now_replace_the_persona_list(served):
    _, stub = served
    actions = [pb.ActionSpec(name="sell"),
               pb.ActionSpec(name="follow", description="follow someone",
                             args_schema_json='{"type": "object", "properties": {"target": {"enum": ["player"]}}}')]
    for seed in range(3):
        finished = structured_line(say(stub, request_id=f"n{seed}", persona="trader", line="Come with me.",
                                       actions=actions, sampling=pb.SamplingOverrides(temperature=1.0, seed=seed,
                                                                                      max_tokens=6)))
        assert finished.action.name in {"sell", "follow"}  # `none` is not valid right now
        if finished.action.name == "follow":
            assert json.loads(finished.action.args_json) == {"target": "player"}


def test_response_format_is_followed_and_free_text_stays_free(served):
    _, stub = served
    schema = {"type": "object", "properties": {"say": {"type": "string", "maxLength": 40},
                                               "gold": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["say", "gold"], "additionalProperties": False}
    events = say(stub, request_id="rf", persona="plain", line="How much?", response_format=json.dumps(schema),
                 sampling=pb.SamplingOverrides(temperature=1.0, seed=1, max_tokens=8))
    kinds = [e.WhichOneof("kind") for e in events]
    assert set(kinds[1:-1]) <= {"delta"}  # no emotion or action in this shape: Finished.json holds it all
    finished = events[-1].finished
    jsonschema.validate(json.loads(finished.json), schema)
    assert not finished.HasField("action") and not finished.HasField("emotion")
    free = say(stub, request_id="free", persona="trader", line="A rope, please.")[-1].finished
    assert free.json == "" and not free.HasField("action")


@pytest.mark.parametrize("fields, code, message", [
    ({"response_format": "{not json"}, "INVALID_ARGUMENT", "response_format: not JSON: Expecting property name"),
    ({"response_format": '{"type": "object", "properties": {"n": {"type": "integr"}}}'}, "INVALID_ARGUMENT",
     "response_format: not a valid JSON Schema: $.properties.n.type: 'integr' is not valid"),
    ({"response_format": '{"type": "string", "pattern": "(("}'}, "INVALID_ARGUMENT",
     "response_format: the JSON Schema cannot be compiled into a grammar: Regex parsing error"),
    ({"actions": [pb.ActionSpec(name="fly")]}, "INVALID_ARGUMENT",
     "actions[0].name: 'fly' is not an action of persona 'trader' (its actions: none, sell)"),
    ({"actions": [pb.ActionSpec(name="Fly!")]}, "INVALID_ARGUMENT", "actions[0].name: must match"),
    ({"actions": [pb.ActionSpec(name="sell"), pb.ActionSpec(name="sell")]}, "INVALID_ARGUMENT",
     "actions[1].name: 'sell' is listed twice"),
    ({"actions": [pb.ActionSpec(name="hop", args_schema_json='{"type": "array"}')]}, "INVALID_ARGUMENT",
     "actions[0].args_schema_json: must describe an object"),
    ({"response_format": "x" * 20000}, "INVALID_ARGUMENT", "response_format: at most 16384 characters, got 20000"),
])
def test_bad_structured_fields_are_refused_by_name(served, fields, code, message):
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        say(stub, request_id="bad", persona="trader", line="Hi.", **fields)
    assert info.value.code().name == code and message in info.value.details(), info.value.details()


def test_a_persona_whose_actions_do_not_compile_is_reported_at_load(served):
    _, stub = served
    broken = stub.GetPersona(pb.GetPersonaRequest(id="broken"))
    assert broken.status == pb.LOAD_STATUS_ERROR
    assert "broken.yaml: actions: the JSON Schema cannot be compiled into a grammar" in broken.error


def test_a_session_mixes_structured_and_free_lines_in_one_tick(served):
    _, stub = served
    session = SessionClient(stub)
    session.send([pb.SayRequest(request_id=f"t{i}", persona="trader", line="Sword?", structured=i % 2 == 0,
                                sampling=pb.SamplingOverrides(temperature=1.0, seed=i, max_tokens=6))
                  for i in range(6)] + [pb.SayRequest(request_id="bad", persona="trader", line="x",
                                                      response_format="[")])
    events = []
    for event in session:
        events.append(event)
        if sum(e.WhichOneof("kind") in ("finished", "error") for e in events) == 7:
            break
    session.close()
    lines = by_request(events)
    assert lines["bad"][0].error.status == "INVALID_ARGUMENT"
    for i in range(6):
        if i % 2 == 0:
            structured_line(lines[f"t{i}"])
        else:
            assert {e.WhichOneof("kind") for e in lines[f"t{i}"]} <= {"started", "delta", "finished"}
