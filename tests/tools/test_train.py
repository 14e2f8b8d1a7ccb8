"""Adapter training on a tiny random Llama: PEFT output, loss curve, reproducibility."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npcd.personas.loader import load_persona
from npcd.cli import train as train_cli
from npcd.tools import train

EXAMPLES = [("Who are you?", "Nobody you need to know, human."),
            ("Can I pass?", "The trees may let you. I might not."),
            ("Nice weather.", "The sun shines kindly on the stumps."),
            ("Where is the village?", "East, where the stupidity begins."),
            ("Help me.", "Humans ask for help the way wolves ask for meat.")]


@pytest.fixture
def persona_path(tmp_path) -> Path:
    lines = "".join(f"  - {{speaker: Player, line: '{q}', reply: '{r}'}}\n" for q, r in EXAMPLES)
    path = tmp_path / "personas" / "elf.yaml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""\
        id: forest_elf
        display_name: Ithilwen
        description: A bitter elf.
        system_prompt: You are Ithilwen.
        adapter: adapters/forest_elf
        examples:
        """) + lines)
    return path


def config(base: Path, **changes) -> train.TrainConfig:
    values = dict(base=str(base), steps=3, rank=4, alpha=8.0, batch_size=2, lr=1e-2, warmup_steps=1,
                  targets=("q_proj", "v_proj", "down_proj"))
    return train.TrainConfig(**{**values, **changes})


def test_training_writes_a_loadable_peft_adapter_and_a_png(tiny_model_dir, persona_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    persona = load_persona(persona_path, require_adapter=False)
    out, plot = tmp_path / "out" / "elf", tmp_path / "loss.png"
    result = train.train_adapter(persona, config(tiny_model_dir, top_layers=1), out, plot, progress=False)
    assert len(result.losses) == 3 and all(x > 0 for x in result.losses)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in weights.items())
    assert all(".layers.1." in k for k in weights)  # only the top layer of two is adapted
    assert json.loads((out / "training.json").read_text())["train_examples"] == len(persona.train_examples)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.disable_adapter():
        plain = model(ids).logits
    assert not torch.allclose(model(ids).logits, plain)  # the trained adapter changes the output


def test_the_engine_reads_the_trained_adapter(tiny_model_dir, persona_path, tmp_path):
    from npcd.engine.config import EngineConfig
    from npcd.engine.engine import Engine

    persona = load_persona(persona_path, require_adapter=False)
    out = tmp_path / "elf"
    train.train_adapter(persona, config(tiny_model_dir, steps=1), out, progress=False)
    engine = Engine(EngineConfig(base=str(tiny_model_dir), weights="fp32", device="cpu", max_batch_size=2,
                                 max_seq_len=128, threads=2))
    info = engine.load_adapter("forest_elf", str(out))
    assert info.rank == 4 and set(info.target_modules) == {"q_proj", "v_proj", "down_proj"}


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir, persona_path, tmp_path):
    persona = load_persona(persona_path, require_adapter=False)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = train.train_adapter(persona, config(tiny_model_dir, seed=seed), tmp_path / name, progress=False)
        runs[name] = (result.losses, load_file(str(tmp_path / name / "adapter_model.safetensors")))
    assert runs["a"][0] == runs["b"][0]
    assert runs["a"][1].keys() == runs["b"][1].keys()
    assert all(torch.equal(runs["a"][1][k], runs["b"][1][k]) for k in runs["a"][1])
    assert any(not torch.equal(runs["a"][1][k], runs["c"][1][k]) for k in runs["a"][1])


@pytest.mark.parametrize("first_trained", [0, 1])
def test_loss_counts_only_reply_tokens_and_matches_the_full_model_loss(tiny_model_dir, persona_path, first_trained):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    persona = load_persona(persona_path, require_adapter=False)
    pairs = train.encode(persona, AutoTokenizer.from_pretrained(tiny_model_dir))[:3]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                      layers_pattern="layers", init_lora_weights=False, task_type="CAUSAL_LM"))
    width = max(len(p) + len(r) for p, r in pairs) + 3  # padding beyond the longest must not matter
    batch = train.collate(pairs, train.frozen_prefix(model, pairs, first_trained), width)
    ids = torch.zeros_like(batch["labels"])
    for i, (prompt, reply) in enumerate(pairs):
        row = batch["labels"][i]
        assert (row[: len(prompt)] == train.IGNORE).all()
        assert row[len(prompt): len(prompt) + len(reply)].tolist() == reply
        assert (row[len(prompt) + len(reply):] == train.IGNORE).all()
        ids[i, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
    full = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(train.reply_loss(model, batch, first_trained), full, atol=1e-5)


def test_a_few_steps_on_one_batch_lower_the_loss(tiny_model_dir, persona_path, tmp_path):
    persona = load_persona(persona_path, require_adapter=False)
    result = train.train_adapter(persona, config(tiny_model_dir, steps=8, batch_size=4, lr=2e-2), tmp_path / "x",
                                 progress=False)
    assert sum(result.losses[-2:]) < sum(result.losses[:2])


def test_command_line_writes_next_to_the_persona(tiny_model_dir, persona_path, capsys):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["forest_elf", "--personas", str(persona_path.parent), "--base", str(tiny_model_dir),
                              "--steps", "2", "--rank", "2", "--batch-size", "2", "--targets", "o_proj"])
    assert train_cli.run(args) == 0
    adapter = persona_path.parent / "adapters" / "forest_elf"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "loss.png").is_file()
    assert load_persona(persona_path).adapter_path == adapter.resolve()
    assert "2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("changes,message", [
    ({"targets": ("q_proj", "wq")}, "unknown module"),
    ({"rank": 0}, "--rank"),
    ({"steps": 0}, "--steps"),
    ({"save_dtype": "float16"}, "--save-dtype"),
])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**changes).validate()


def test_unknown_persona_is_named(persona_path):
    with pytest.raises(ValueError, match="no persona with id 'nobody'"):
        train.find_persona(persona_path.parent, "nobody")


def test_validation_split_is_seeded_disjoint_and_optional():
    train_idx, val_idx = train.split_validation(90, 0.1, seed=0)
    assert len(val_idx) == 9 and sorted(train_idx + val_idx) == list(range(90))
    assert train.split_validation(90, 0.1, seed=0) == (train_idx, val_idx)
    assert train.split_validation(90, 0.1, seed=1)[1] != val_idx
    assert train.split_validation(90, 0.0, seed=0) == (list(range(90)), [])
    assert train.split_validation(3, 0.1, seed=0) == ([0, 1, 2], [])  # too few to spare one


def test_early_stopping_keeps_the_step_with_the_lowest_validation_loss(tiny_model_dir, persona_path, tmp_path):
    persona = load_persona(persona_path, require_adapter=False)
    out = tmp_path / "x"
    result = train.train_adapter(persona, config(tiny_model_dir, steps=6, eval_every=2, val_fraction=0.2), out,
                                 progress=False)
    assert sorted(result.val_losses) == [2, 4, 6]
    assert result.best_step == min(result.val_losses, key=result.val_losses.__getitem__)
    record = json.loads((out / "training.json").read_text())
    assert record["validation_examples"] == 1 and record["best_step"] == result.best_step
    assert len(record["losses"]) == 6
    plain = train.train_adapter(persona, config(tiny_model_dir, val_fraction=0.0), tmp_path / "y", progress=False)
    assert plain.best_step is None and plain.val_losses == {}


def test_a_run_whose_last_step_was_best_is_flagged_as_still_improving(tmp_path):
    def result(best_step):
        return train.TrainResult(tmp_path, losses=[3.0, 2.5, 2.0, 1.8], plot=None, seconds=1.0,
                                 val_losses={2: 3.1, 4: 3.0}, best_step=best_step)

    assert result(4).still_improving()
    assert not result(2).still_improving()
    assert not result(None).still_improving()  # no validation split: nothing to judge by


def test_bad_validation_settings_are_named():
    with pytest.raises(ValueError, match="--val-fraction"):
        train.TrainConfig(val_fraction=0.6).validate()
    with pytest.raises(ValueError, match="--eval-every"):
        train.TrainConfig(eval_every=0).validate()
