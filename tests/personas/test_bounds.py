"""The sampling bounds are one table: the schema, the persona loader, the wire and the engine agree on it."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from npcd.engine.api import (
    SAMPLING_BOUNDS,
    STOP_CHARS,
    STOP_STRINGS,
    Bound,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)
from npcd.engine.engine import Engine
from npcd.personas.loader import PersonaError, SamplingDefaults, load_persona
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import Limits
from npcd.service.validation import RequestError, sampling_for, validate

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "personas" / "schema.json").read_text())

# Engine.validate reads only these of the engine: no model needs loading to check a request's sampling
ENGINE = SimpleNamespace(max_seq_len=64, spec=SimpleNamespace(vocab_size=16))

PERSONA = """\
id: elf
display_name: Elf
description: An elf.
system_prompt: You are an elf.
"""


def test_schema_sampling_bounds_are_the_table():
    props = SCHEMA["properties"]["sampling"]["properties"]
    assert set(props) == set(SAMPLING_BOUNDS)
    for name, bound in SAMPLING_BOUNDS.items():
        low_key = "exclusiveMinimum" if bound.low_open else "minimum"
        want = {"type": "integer" if bound.kind is int else "number", low_key: bound.low, "maximum": bound.high}
        assert {k: v for k, v in props[name].items() if k != "description"} == want, name


def test_schema_stop_bounds_are_the_table():
    stop = SCHEMA["properties"]["stop"]
    assert STOP_STRINGS.low == 0 and "minItems" not in stop
    assert stop["maxItems"] == STOP_STRINGS.high
    assert (stop["items"]["minLength"], stop["items"]["maxLength"]) == (STOP_CHARS.low, STOP_CHARS.high)


def test_persona_defaults_are_the_table_and_in_bounds():
    assert {f.name for f in fields(SamplingDefaults)} == set(SAMPLING_BOUNDS)
    for defaults in (SamplingDefaults(), SamplingParams()):
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(defaults, name)
            assert value in bound and isinstance(value, bound.kind), (type(defaults).__name__, name)


def test_check_names_the_limit_in_both_vocabularies():
    top_p = SAMPLING_BOUNDS["top_p"]
    assert top_p.check(1.0) is None and top_p.check(0.0) == "must be in (0, 1], got 0"
    assert top_p.check(0.0, plain=True) == "must be greater than 0 and at most 1, got 0"
    temperature = SAMPLING_BOUNDS["temperature"]
    assert temperature.check(0.0) is None and temperature.check(2.5, plain=True) == "must be between 0 and 2, got 2.5"
    assert temperature.check(math.nan) == "must be in [0, 2], got nan"
    assert SAMPLING_BOUNDS["top_k"].check(-1) == "must be in [0, 1000000], got -1"  # ints never as 1e+06
    assert STOP_CHARS.check(0) == "must be 1 to 64 characters, got 0"
    assert STOP_STRINGS.describe() == "at most 8 strings"


def test_an_operator_cap_only_narrows():
    bound = Bound(1, 512, kind=int)
    assert bound.capped(100) == Bound(1, 100, kind=int)
    assert bound.capped(4096) == bound


def edges(bound: Bound) -> tuple[list[float], list[float]]:
    """(values on the edge that are allowed, values just past it that are refused)"""
    step = 1 if bound.kind is int else 0.25
    inside, outside = [bound.high], [bound.high + step, bound.low - step]
    (outside if bound.low_open else inside).append(bound.low)
    return [bound.kind(v) for v in inside], [bound.kind(v) for v in outside]


CASES = [(name, value, ok) for name, bound in SAMPLING_BOUNDS.items()
         for values, ok in zip(edges(bound), (True, False)) for value in values]


@pytest.mark.parametrize("name,value,ok", CASES, ids=[f"{n}={v}" for n, v, _ in CASES])
def test_loader_wire_and_engine_agree_at_every_edge(tmp_path, name, value, ok):
    path = tmp_path / "elf.yaml"
    path.write_text(PERSONA + f"sampling: {{{name}: {value}}}\n")
    unsendable = name == "top_k" and value < 0  # unsigned on the wire: protobuf refuses to build it
    wire = None if unsendable else pb.SayRequest(persona="elf", line="Hi",
                                                 sampling=pb.SamplingOverrides(**{name: value}))
    engine_request = GenerationRequest("r", [1, 2], SamplingParams(**{name: value}))

    if ok:
        assert getattr(load_persona(path).sampling, name) == value
        if wire is not None:
            validate(wire, Limits())
        Engine.validate(ENGINE, engine_request)
        return
    with pytest.raises(PersonaError, match=rf"sampling\.{name}: must be (between|greater than)"):
        load_persona(path)
    if wire is not None:
        with pytest.raises(RequestError, match=rf"^sampling\.{name}: must be in [\[(]"):
            validate(wire, Limits())
    with pytest.raises(InvalidRequest, match=rf"{name} must be in [\[(]"):
        Engine.validate(ENGINE, engine_request)


def test_stop_strings_are_held_to_the_same_bounds(tmp_path):
    too_long = "x" * (STOP_CHARS.high + 1)
    path = tmp_path / "elf.yaml"
    path.write_text(PERSONA + f"stop: ['{too_long}']\n")
    with pytest.raises(PersonaError, match="stop\\[0\\]: must be 1 to 64 characters, got 65"):
        load_persona(path)
    path.write_text(PERSONA + f"stop: {['.'] * (STOP_STRINGS.high + 1)}\n")
    with pytest.raises(PersonaError, match="stop: must hold at most 8 strings, got 9"):
        load_persona(path)
    with pytest.raises(RequestError, match=r"^sampling\.stop\[0\]: must be 1 to 64 characters, got 65"):
        validate(pb.SayRequest(persona="elf", line="Hi", sampling=pb.SamplingOverrides(stop=[too_long])), Limits())
    with pytest.raises(InvalidRequest, match=r"stop\[1\] must be 1 to 64 characters, got 0"):
        Engine.validate(ENGINE, GenerationRequest("r", [1, 2], SamplingParams(stop=(".", ""))))


def test_the_operator_caps_narrow_the_wire_bounds():
    limits = Limits(max_tokens=100, max_stop_strings=2)
    with pytest.raises(RequestError, match=r"^sampling\.max_tokens: must be in \[1, 100\], got 101"):
        validate(pb.SayRequest(persona="elf", line="Hi", sampling=pb.SamplingOverrides(max_tokens=101)), limits)
    with pytest.raises(RequestError, match=r"^sampling\.stop: at most 2 strings, got 3"):
        validate(pb.SayRequest(persona="elf", line="Hi", sampling=pb.SamplingOverrides(stop=["a", "b", "c"])), limits)
    with pytest.raises(RequestError, match=r"^sampling\.max_tokens: must be in \[1, 512\], got 513"):  # not widened
        validate(pb.SayRequest(persona="elf", line="Hi", sampling=pb.SamplingOverrides(max_tokens=513)),
                 Limits(max_tokens=4096))


def test_sampling_for_is_the_personas_sampling_under_the_operators_cap(tmp_path):
    path = tmp_path / "elf.yaml"
    path.write_text(PERSONA + 'sampling: {max_tokens: 300, temperature: 0.5}\nstop: ["\\n"]\n')
    persona = load_persona(path)
    overrides = pb.SamplingOverrides(temperature=0.0, seed=3, stop=["\n", "."])
    assert sampling_for(persona, overrides, Limits(max_tokens=100)) == persona.sampling_params(
        seed=3, overrides={"temperature": 0.0, "max_tokens": 100}, extra_stop=["."])
