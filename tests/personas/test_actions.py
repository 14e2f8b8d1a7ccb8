"""Persona actions and emotions: the YAML fields, the reply schema built from them, and the errors designers see."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from npcd.personas import actions as act
from npcd.personas.loader import PersonaError, load_dir, load_persona

PERSONAS_DIR = Path(__file__).resolve().parents[2] / "personas"
BASE = "id: trader\ndisplay_name: Trader\ndescription: x\nsystem_prompt: x\n"
SELL = act.Action("sell", "sell an item", {"type": "object", "properties": {
    "item": {"enum": ["rope", "sword"]}, "price": {"type": "integer", "minimum": 1, "maximum": 1000},
    "note": {"type": "string"}}})


def test_reply_schema_puts_say_first_and_closes_every_action():
    schema = act.reply_schema([SELL, act.Action("none")], ["calm", "amused"])
    assert list(schema["properties"]) == ["say", "emotion", "action"]
    assert schema["required"] == ["say", "emotion", "action"] and schema["additionalProperties"] is False
    sell, none = schema["properties"]["action"]["anyOf"]
    args = sell["properties"]["args"]
    assert args["additionalProperties"] is False and args["required"] == ["item", "price", "note"]
    assert args["properties"]["note"]["maxLength"] == act.ARG_STRING_MAX_CHARS  # a free string is bounded
    assert none["properties"] == {"name": {"const": "none"}} and none["required"] == ["name"]
    assert SELL.args["properties"]["note"] == {"type": "string"}  # the declaration itself is untouched
    good = {"say": "Forty silver.", "emotion": "amused", "action": {"name": "sell", "args": {
        "item": "sword", "price": 40, "note": "sharp"}}}
    jsonschema.validate(good, schema)
    for bad in ({**good, "emotion": "furious"},
                {**good, "action": {"name": "sell", "args": {"item": "sword", "price": 40, "note": "", "x": 1}}},
                {**good, "action": {"name": "fly"}}, {"say": "hi", "emotion": "calm"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_a_schema_without_emotions_or_actions_is_the_line_alone():
    schema = act.reply_schema([], [])
    assert list(schema["properties"]) == ["say"] and act.text_field(schema) == "say"
    assert act.text_field({"type": "object", "properties": {"reply": {"type": "string"}}}) is None
    assert act.canonical(schema).startswith('{"type":"object","properties":{"say":')  # key order kept


def test_menu_and_signature_show_the_choices():
    text = act.menu([SELL, act.Action("none", "just talk")], ["calm"])
    assert text == ('Actions you can take: sell {"item": rope|sword, "price": 1-1000, "note": string} - sell an item; '
                    "none - just talk.\nEmotions: calm.")


def test_pick_resolves_names_to_the_persona_declarations():
    wave = act.Action("wave", "wave at the player")
    assert act.pick([SELL, act.Action("none")], [act.Action("sell"), wave]) == (SELL, wave)


@pytest.mark.parametrize("schema, path", [
    ({"type": "object", "properties": {"price": {"type": "integr"}}}, "$.properties.price.type"),
    ({"type": "object", "properties": {"price": {"minimum": "one"}}}, "$.properties.price.minimum"),
    ({"type": "object", "required": "item"}, "$.required"),
])
def test_schema_problems_name_the_json_path(schema, path):
    assert act.schema_problem(schema).startswith(f"{path}: ")
    assert act.schema_problem(["not", "a", "schema"]).startswith("$: must be a JSON object")
    assert act.schema_problem({"type": "object"}) is None


@pytest.mark.parametrize("yaml_text, where, message", [
    ("actions:\n  - name: Sell\n", ":6: actions[0].name", "must match"),
    ("actions:\n  - name: sell\n  - name: sell\n", ":7: actions[1].name", "declared twice"),
    ("actions:\n  - description: x\n", ":6: actions[0]", "misses the required key 'name'"),
    ("actions:\n  - name: sell\n    args: {type: object, properties: {price: {type: integr}}}\n",
     ":7: actions[0].args", "not a valid JSON Schema: $.properties.price.type"),
    ("actions:\n  - name: sell\n    args: {type: string}\n", ":7: actions[0].args", "must describe an object"),
    ("actions:\n  - name: sell\n    cost: 3\n", ":7: actions[0].cost", "unknown key"),
    ("emotions: [calm, calm]\n", ":5: emotions[1]", "listed twice"),
    ("emotions: calm\n", ":5: emotions", "must be a list"),
    ("actions:\n  - name: sell\nsituations:\n  - {line: hi, expect: fly}\n", ":8: situations[0].expect",
     "'fly' is not one of this persona's actions (sell)"),
    ("situations:\n  - {expect: sell}\n", ":6: situations[0]", "misses the required key 'line'"),
])
def test_persona_file_errors_name_file_line_and_field(tmp_path, yaml_text, where, message):
    path = tmp_path / "trader.yaml"
    path.write_text(BASE + yaml_text)
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    assert f"trader.yaml{where}: " in str(info.value) and message in str(info.value), str(info.value)


def test_a_valid_declaration_loads(tmp_path):
    path = tmp_path / "trader.yaml"
    path.write_text(BASE + "emotions: [calm, greedy]\nactions:\n  - name: sell\n    description: sell it\n"
                    "    args: {type: object, properties: {price: {type: integer, minimum: 1, maximum: 9}}}\n"
                    "  - name: none\nsituations:\n  - {line: Sell me rope., expect: sell}\n"
                    "  - {speaker: Mira, line: Hi., expect: [none, sell], context: {mood: happy}}\n")
    persona = load_persona(path)
    assert persona.emotions == ("calm", "greedy") and [a.name for a in persona.actions] == ["sell", "none"]
    assert persona.actions[0].args["properties"]["price"]["maximum"] == 9
    assert [(s.speaker, s.expect, s.context) for s in persona.situations] == [
        ("Player", ("sell",), {}), ("Mira", ("none", "sell"), {"mood": "happy"})]


def test_shipped_personas_act_and_carry_labelled_situations():
    personas, errors = load_dir(PERSONAS_DIR)
    assert errors == []
    acting = {pid: p for pid, p in personas.items() if p.actions}
    assert {"merchant", "town_guard", "villain"} <= set(acting)
    for persona in acting.values():
        assert len(persona.situations) >= 30 and persona.emotions
        names = {a.name for a in persona.actions}
        assert "none" in names and len(names) >= 3
        assert {n for s in persona.situations for n in s.expect} == names, persona.id  # every action is tested
        json.dumps(act.reply_schema(persona.actions, persona.emotions))
