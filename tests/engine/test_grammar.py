"""Grammar-constrained replies: every row follows its own schema, free rows are untouched, the line streams.

The tiny random model writes noise, which is the point for the grammar tests: whatever a model would sample,
the reply parses and validates. The real-model test runs the shipped personas and adapters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch

from npcd.engine.api import (
    FieldDone,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    StructuredOutput,
    TextDelta,
)
from npcd.engine.engine import Engine
from npcd.engine.api import STRUCTURE_TOKENS
from npcd.engine.grammar import pack
from npcd.personas.actions import SAY_FIELD, Action, canonical, menu, reply_schema, text_field

SELL = Action("sell", "sell an item", {"type": "object", "properties": {
    "item": {"enum": ["rope", "sword", "lantern"]}, "price": {"type": "integer", "minimum": 1, "maximum": 1000}}})
FOLLOW = Action("follow", "follow someone", {"type": "object", "properties": {"target": {"type": "string"}}})
PERSONA_SCHEMA = reply_schema([SELL, FOLLOW, Action("none")], ["calm", "annoyed", "amused"])
CUSTOM_SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["up", "down"]},
                                                  "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                           "maxItems": 3}},
                 "required": ["mood", "count", "tags"], "additionalProperties": False}


def structured(schema: dict) -> StructuredOutput:
    return StructuredOutput(canonical(schema), text_field(schema))


def collect(engine: Engine):
    events: dict[str, list] = {}
    return events, lambda e: events.setdefault(e.request_id, []).append(e)


def run(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def check_reply(events: list, schema: dict) -> dict:
    """The reply validates; its streamed text is its line; each other field came once, in order, as FieldDone."""
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason is FinishReason.STOP, finished
    reply = json.loads(finished.json)
    jsonschema.validate(reply, schema)
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == finished.text == reply.get(SAY_FIELD, "")
    fields = [(e.name, e.value) for e in events if isinstance(e, FieldDone)]
    assert fields == [(k, v) for k, v in reply.items() if k != text_field(schema)]
    return reply


def test_pack_sets_the_bits_xgrammar_reads():
    import xgrammar as xgr

    allowed = torch.rand(1000) < 0.3
    logits = torch.zeros(1, 1000)
    xgr.apply_token_bitmask_inplace(logits, pack(allowed).unsqueeze(0), vocab_size=1000)
    assert torch.equal(torch.isinf(logits[0]), ~allowed)


def test_each_row_follows_its_own_grammar_and_free_rows_are_untouched(tiny_config, tiny_adapters):
    engine = Engine(tiny_config)
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, str(path))
    prompt = engine.tokenizer.encode("The merchant looks up from his stall.")
    adapters = [None, *tiny_adapters]
    free = [GenerationRequest(f"free{i}", prompt[i:], SamplingParams(max_tokens=16), adapter=adapters[i % 5])
            for i in range(3)]
    alone = {r.request_id: engine.generate([r])[0].text for r in free}
    schemas = [PERSONA_SCHEMA, CUSTOM_SCHEMA, reply_schema([], [])]
    rows = [GenerationRequest(f"s{i}", prompt[i % 4:], SamplingParams(max_tokens=12, temperature=1.0, seed=i),
                              adapter=adapters[i % 5], structured=structured(schemas[i % 3])) for i in range(9)]
    events, sink = collect(engine)
    engine.submit_many([(r, sink) for r in rows + free])
    run(engine)
    replies = [check_reply(events[r.request_id], schemas[i % 3]) for i, r in enumerate(rows)]
    assert {r["action"]["name"] for r in replies[::3]} <= {"sell", "follow", "none"}
    for r in free:  # a grammar only ever touches its own row
        assert events[r.request_id][-1].text == alone[r.request_id]
        assert not any(isinstance(e, FieldDone) for e in events[r.request_id])


def test_the_line_closes_when_max_tokens_are_spent(tiny_config):
    engine = Engine(tiny_config)
    schema = reply_schema([], ["calm"])
    events, sink = collect(engine)
    for seed in range(4):
        engine.submit(GenerationRequest(f"r{seed}", [1, 2, 3], SamplingParams(max_tokens=3, temperature=1.5,
                                                                               seed=seed),
                                        structured=structured(schema)), sink)
    run(engine)
    for seed in range(4):
        finished = events[f"r{seed}"][-1]
        check_reply(events[f"r{seed}"], schema)
        say_tokens = len(engine.tokenizer.encode(json.dumps(finished.text)))
        assert say_tokens <= 3 + 2 and finished.completion_tokens <= 3 + STRUCTURE_TOKENS


def test_a_schema_the_compiler_refuses_is_an_invalid_request(tiny_config):
    engine = Engine(tiny_config)
    bad = StructuredOutput('{"type":"object","properties":{"a":{"type":"string","pattern":"(("}}}')
    with pytest.raises(InvalidRequest, match=r"^the JSON Schema cannot be compiled into a grammar: Regex parsing"):
        engine.submit(GenerationRequest("bad", [1, 2], structured=bad), lambda e: None)
    assert not engine.has_work()
    ok = engine.generate([GenerationRequest("ok", [1, 2], SamplingParams(max_tokens=3))])[0]
    assert ok.completion_tokens == 3


def test_200_constrained_lines_of_the_shipped_personas_all_validate(real_model_dir):
    """Every persona, its own adapter, persona/request/custom schemas mixed in the same steps, sampled as each
    persona samples, with free greedy lines alongside that must not change."""
    from npcd.engine.config import EngineConfig
    from npcd.personas.loader import load_dir
    from npcd.personas.prompt import PromptBuilder

    personas, _ = load_dir(Path(__file__).resolve().parents[2] / "personas")
    engine = Engine(EngineConfig(max_batch_size=32, max_seq_len=512, max_resident_adapters=8))
    for pid, persona in personas.items():
        engine.load_adapter(pid, str(persona.adapter_path))
    prompts = PromptBuilder(engine.tokenizer)
    rng = random.Random(0)
    wave = Action("wave", "wave at the player")
    free, rows = [], []
    for i, (pid, persona) in enumerate(sorted(personas.items())):
        p = prompts.build(persona, speaker="Player", line=persona.held_out_examples[0].line)
        free.append(GenerationRequest(f"free-{pid}", p.ids, SamplingParams(max_tokens=16), adapter=pid,
                                      prefix_len=p.prefix_len))
    alone = {r.request_id: engine.generate([r])[0].text for r in free}
    ids = sorted(personas)
    for i in range(200):
        persona = personas[ids[i % len(ids)]]
        kind = ("persona", "persona", "actions", "custom")[i % 4]
        if kind == "custom":
            schema = CUSTOM_SCHEMA
        elif kind == "actions":
            schema = reply_schema((*rng.sample(persona.actions, min(2, len(persona.actions))), wave),
                                  persona.emotions)
        else:
            schema = json.loads(persona.reply_schema())
        actions = [a for a in persona.actions] if kind == "persona" else [wave]
        line = rng.choice(persona.situations or persona.examples).line
        p = prompts.build(persona, speaker="Player", line=line, menu=menu(actions, persona.emotions))
        rows.append((GenerationRequest(f"r{i}", p.ids, persona.sampling_params(seed=i, overrides={"max_tokens": 24}),
                                       adapter=persona.id, prefix_len=p.prefix_len, structured=structured(schema)),
                     schema))
    events, sink = collect(engine)
    engine.submit_many([(r, sink) for r, _ in rows[:24]] + [(r, sink) for r in free] +
                       [(r, sink) for r, _ in rows[24:]])
    run(engine)
    for request, schema in rows:
        check_reply(events[request.request_id], schema)
    for r in free:
        assert events[r.request_id][-1].text == alone[r.request_id], r.request_id
