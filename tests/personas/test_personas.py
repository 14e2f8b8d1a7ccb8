"""Persona files: valid ones load, every kind of mistake names its file, line and field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from npcd.engine.api import SamplingParams
from npcd.personas.loader import (
    EXAMPLE_KEYS,
    TOP_LEVEL_KEYS,
    PersonaError,
    SamplingDefaults,
    load_dir,
    load_persona,
)

PERSONAS_DIR = Path(__file__).resolve().parents[2] / "personas"

VALID = """\
id: forest_elf
display_name: Ithilwen
description: A bitter forest elf.
system_prompt: |
  You are Ithilwen.
sampling:
  temperature: 0.5
  top_k: 20
stop: ["\\n\\n"]
few_shot: 1
examples:
  - speaker: Player
    line: Who are you?
    reply: Nobody you need to know, human.
    context: {location: forest edge, hour: 3}
metadata:
  voice_id: elf_female_02
  emotion_tags: [contempt, sorrow]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def make_adapter(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    return directory


def test_valid_file_loads_with_defaults_and_types(tmp_path):
    p = load_persona(write(tmp_path, "elf.yaml", VALID))
    assert p.id == "forest_elf" and p.display_name == "Ithilwen"
    assert p.system_prompt == "You are Ithilwen."
    assert p.sampling == SamplingDefaults(temperature=0.5, top_k=20)
    assert isinstance(p.sampling.temperature, float)
    assert p.stop == ("\n\n",)
    assert p.examples[0].context == {"location": "forest edge", "hour": "3"}
    assert p.metadata == {"voice_id": "elf_female_02", "emotion_tags": ["contempt", "sorrow"]}
    assert p.adapter_path is None
    assert p.source == (tmp_path / "elf.yaml").resolve()
    assert "{{ line }}" in p.template  # the default template


def test_sampling_params_are_the_defaults_with_a_requests_changes_on_top(tmp_path):
    p = load_persona(write(tmp_path, "elf.yaml", VALID))
    assert p.sampling_params(seed=7) == SamplingParams(max_tokens=60, temperature=0.5, top_p=0.9, top_k=20,
                                                       repetition_penalty=1.1, seed=7, stop=("\n\n",))
    changed = p.sampling_params(overrides={"temperature": 0.0, "max_tokens": 8}, extra_stop=["\n\n", "."])
    assert (changed.temperature, changed.max_tokens, changed.top_k, changed.seed) == (0.0, 8, 20, None)
    assert changed.stop == ("\n\n", ".")  # the persona's own first, none twice


def test_adapter_path_resolves_relative_to_the_file(tmp_path):
    make_adapter(tmp_path / "adapters" / "elf")
    p = load_persona(write(tmp_path, "elf.yaml", VALID + "adapter: adapters/elf\n"))
    assert p.adapter_path == (tmp_path / "adapters" / "elf").resolve()


def test_digest_changes_with_the_file_and_with_the_adapter(tmp_path):
    adapter = make_adapter(tmp_path / "adapters" / "elf")
    path = write(tmp_path, "elf.yaml", VALID + "adapter: adapters/elf\n")
    first = load_persona(path).digest
    assert load_persona(path).digest == first
    (adapter / "adapter_model.safetensors").write_bytes(b"new weights, longer")
    second = load_persona(path).digest
    assert second != first
    path.write_text(path.read_text().replace("Ithilwen", "Ithil"))
    assert load_persona(path).digest not in (first, second)


def test_held_out_split_is_fifteen_percent_and_disjoint(tmp_path):
    examples = "".join(f"  - {{speaker: P, line: 'q{i}', reply: 'r{i}'}}\n" for i in range(100))
    text = VALID.split("examples:")[0] + "examples:\n" + examples
    p = load_persona(write(tmp_path, "elf.yaml", text))
    assert len(p.held_out_examples) == 15 and len(p.train_examples) == 85
    assert not set(p.held_out_examples) & set(p.train_examples)
    assert p.few_shot_examples == p.train_examples[:1]


# (text to replace in VALID, replacement, expected line, field, message part)
BAD_CASES = [
    ("  temperature: 0.5", "  temperature: 3.5", 7, "sampling.temperature", "must be between 0 and 2, got 3.5"),
    ("  top_k: 20", "  top_k: -1", 8, "sampling.top_k", "must be between 0 and 1000000, got -1"),
    ("  top_k: 20", "  top_k: many", 8, "sampling.top_k", "must be an integer, got str 'many'"),
    ("  top_k: 20", "  top_p: 0", 8, "sampling.top_p", "greater than 0"),
    ("  top_k: 20", "  temprature: 1", 8, "sampling.temprature", "did you mean 'temperature'?"),
    ("  top_k: 20", "  max_tokens: 0", 8, "sampling.max_tokens", "between 1 and 512"),
    ("display_name: Ithilwen", "display_name: [a, b]", 2, "display_name", "must be a string"),
    ("display_name: Ithilwen", "dispaly_name: Ithilwen", 2, "dispaly_name", "unknown key"),
    ("id: forest_elf", "id: Forest-Elf", 1, "id", "must match"),
    ("few_shot: 1", "few_shot: 5", 10, "few_shot", "only 1 training examples"),
    ("stop: [\"\\n\\n\"]", "stop: [\"\"]", 9, "stop[0]", "must be 1 to 64 characters, got 0"),
    ("stop: [\"\\n\\n\"]", "stop: [7]", 9, "stop[0]", "must be a string, got int 7"),
    ("    reply: Nobody you need to know, human.\n", "", 12, "examples[0]", "misses the required key 'reply'"),
    ("    line: Who are you?", "    line: Who are you?\n    mood: sad", 14, "examples[0].mood", "unknown key"),
    ("{location: forest edge, hour: 3}", "{location: [a]}", 15, "examples[0].context.location", "plain value"),
    ("metadata:\n  voice_id: elf_female_02\n  emotion_tags: [contempt, sorrow]\n", "metadata: 7\n", 16, "metadata",
     "must be a mapping"),
    ("  temperature: 0.5\n", "  temperature: 0.5\n  temperature: 0.6\n", 8, "sampling.temperature", "duplicate key"),
]


@pytest.mark.parametrize("old,new,line,field,message", BAD_CASES, ids=[c[3] + ":" + c[4][:20] for c in BAD_CASES])
def test_mistakes_name_file_line_and_field(tmp_path, old, new, line, field, message):
    assert old in VALID
    path = write(tmp_path, "elf.yaml", VALID.replace(old, new, 1))
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert message in str(err)
    assert str(err).startswith(f"{path}:{line}: {field}: ")


def test_error_string_format():
    err = PersonaError("personas/elf.yaml", 12, "sampling.temperature", "must be between 0 and 2, got 3.5")
    assert str(err) == "personas/elf.yaml:12: sampling.temperature: must be between 0 and 2, got 3.5"
    assert isinstance(err, ValueError)
    assert str(PersonaError("a.yaml", None, None, "the file is empty")) == "a.yaml: the file is empty"


def test_missing_required_field(tmp_path):
    path = write(tmp_path, "elf.yaml", VALID.replace("description: A bitter forest elf.\n", ""))
    with pytest.raises(PersonaError, match=r"elf.yaml:1: description: missing \(this field is required\)"):
        load_persona(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "elf.yaml", VALID.replace("  top_k: 20", "  top_k: [20"))
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    assert info.value.line is not None and info.value.line >= 8 and "invalid YAML" in str(info.value)


def test_not_a_mapping_and_empty_file(tmp_path):
    with pytest.raises(PersonaError, match="must be a mapping"):
        load_persona(write(tmp_path, "a.yaml", "- just\n- a list\n"))
    with pytest.raises(PersonaError, match="the file is empty"):
        load_persona(write(tmp_path, "b.yaml", "# nothing\n"))


def test_template_syntax_error_points_into_the_block(tmp_path):
    text = VALID + "template: |\n  {{ speaker }} says:\n  {% if line %}{{ line }}\n"
    path = write(tmp_path, "elf.yaml", text)
    with pytest.raises(PersonaError) as info:
        load_persona(path)
    assert info.value.field == "template" and "syntax error" in str(info.value)
    template_line = VALID.count("\n") + 1  # the `template: |` line
    assert template_line < info.value.line <= template_line + 3


def test_template_unknown_variable(tmp_path):
    path = write(tmp_path, "elf.yaml", VALID + "template: '{{ speaker }}: {{ lien }}'\n")
    with pytest.raises(PersonaError, match=r"template: unknown variable\(s\) lien; available: speaker, line"):
        load_persona(path)


def test_template_cannot_reach_python_internals(tmp_path):
    path = write(tmp_path, "elf.yaml", VALID + "template: '{{ line.__class__.__mro__ }}'\n")
    with pytest.raises(PersonaError, match="template"):
        load_persona(path)


def test_adapter_directory_must_exist_and_hold_the_peft_files(tmp_path):
    path = write(tmp_path, "elf.yaml", VALID + "adapter: adapters/elf\n")
    with pytest.raises(PersonaError, match=r"adapter: adapter directory .* does not exist"):
        load_persona(path)
    assert load_persona(path, require_adapter=False).adapter_path == (tmp_path / "adapters/elf").resolve()
    adapter = make_adapter(tmp_path / "adapters" / "elf")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PersonaError, match="has no adapter_model.safetensors") as info:
        load_persona(path)
    assert info.value.line == VALID.count("\n") + 1


def test_load_dir_keeps_good_files_and_reports_bad_and_duplicate_ones(tmp_path):
    write(tmp_path, "a_elf.yaml", VALID)
    write(tmp_path, "b_elf_again.yaml", VALID)
    write(tmp_path, "guard.yaml", VALID.replace("forest_elf", "town_guard"))
    write(tmp_path, "broken.yaml", VALID.replace("0.5", "9"))
    (tmp_path / "notes.txt").write_text("not a persona")
    personas, errors = load_dir(tmp_path)
    assert list(personas) == ["town_guard"]
    messages = [str(e) for e in errors]
    assert len(errors) == 3, messages
    assert any("broken.yaml:7: sampling.temperature" in m for m in messages)
    dupes = [m for m in messages if "duplicate id 'forest_elf'" in m]
    assert len(dupes) == 2
    assert any("a_elf.yaml" in m and "also used by b_elf_again.yaml" in m for m in dupes)


def test_load_dir_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dir(tmp_path / "nope")


def test_schema_knows_exactly_the_loaders_keys():
    schema = json.loads((PERSONAS_DIR / "schema.json").read_text())
    assert set(schema["properties"]) == set(TOP_LEVEL_KEYS)
    assert set(schema["properties"]["sampling"]["properties"]) == set(SamplingDefaults.__dataclass_fields__)
    assert set(schema["properties"]["examples"]["items"]["properties"]) == set(EXAMPLE_KEYS)


def test_shipped_personas_load_and_point_editors_at_the_schema():
    files = sorted(PERSONAS_DIR.glob("*.yaml"))
    personas, errors = load_dir(PERSONAS_DIR)
    assert not errors, [str(e) for e in errors]
    assert {"forest_elf", "villain", "merchant", "town_guard", "storyteller", "image_prompter"} <= set(personas)
    for path in files:
        assert path.read_text().startswith("# yaml-language-server: $schema=schema.json\n"), path
    for persona in personas.values():
        assert len(persona.examples) >= 100, persona.id
        assert len(set(e.reply for e in persona.examples)) == len(persona.examples), persona.id

