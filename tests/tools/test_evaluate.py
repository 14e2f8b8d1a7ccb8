"""Evaluation pieces: the attribution classifier, reply NLL through the engine, the report, beats."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from npcd.engine.testing import write_lora
from npcd.personas.loader import load_dir
from npcd.tools.demo import split_beats
from npcd.tools.evaluate import (
    attribution_classifier,
    engine_config,
    evaluate,
    markdown,
    reply_nll,
    table,
)


def predict(classifier, text: str) -> str:
    return str(classifier.predict([text])[0])


def test_attribution_tells_voices_apart():
    nb = attribution_classifier([("merchant", "Only five silver, friend, a bargain!"),
                                 ("merchant", "For you, friend, three coppers."),
                                 ("guard", "Move along, citizen."),
                                 ("guard", "Papers, citizen. Curfew at the ninth bell.")])
    assert predict(nb, "A fine lantern, friend, two silver.") == "merchant"
    assert predict(nb, "Back inside before curfew, citizen.") == "guard"
    scores = dict(zip(nb.classes_, nb.predict_log_proba(["friend"])[0]))
    assert scores["merchant"] > scores["guard"]


def test_attribution_needs_two_classes():
    with pytest.raises(ValueError, match="at least two personas"):
        attribution_classifier([("a", "x"), ("a", "y")])


def test_attribution_fits_the_same_amount_of_text_per_persona():
    # the budget is the smallest persona's feature count and may end inside a line
    nb = attribution_classifier([("long", "one two three four five"), ("long", "six seven"),
                                 ("short", "eight nine ten")])  # 3 words + 2 pairs
    assert list(nb[-1].feature_count_.sum(axis=1)) == [5, 5]
    assert set(nb[1].feature_names_) == {"one", "two", "three", "four", "five", "eight", "nine", "ten",
                                         "eight nine", "nine ten"}


def test_attribution_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.naive_bayes", None)  # what a missing package looks like to import
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'npcd\[eval\]'"):
        attribution_classifier([("a", "x"), ("b", "y")])


def test_attribution_does_not_favour_the_persona_with_more_lines():
    # the guard's designer wrote ten times the lines, full of everyday words; the elf's few
    # lines own "human", so a line with "human" and everyday words is still hers
    guard = [("guard", "Move along, citizen.")] * 4 + \
        [("guard", f"The weather is fine today, number {i}.") for i in range(36)]
    elf = [("elf", "The trees remember, human."), ("elf", "Ash and roots, human."),
           ("elf", "Leave the grove, human."), ("elf", "Your king burned it, human.")]
    nb = attribution_classifier(guard + elf)
    assert predict(nb, "The weather is fine today, human.") == "elf"
    assert predict(nb, "Move along.") == "guard"


TALES = ["Old Maren kept a lighthouse and heard a song from the sea every night, and she told no one.",
         "A thief named Pell stole a star, and it burned his pockets and his greed until he gave it away.",
         "The baker gave bread to a dragon, who paid her in warm stones all winter and came back in spring.",
         "Lina found a small door in an oak tree and climbed the stairs to a room with all her lost toys.",
         "Tomas came home after twenty years and an old dog leaned against his leg in the square.",
         "A map moved a river while the girl slept, and the land walked slowly toward the king.",
         "The poet wrote one word a year, and when he died the words made a song about the town.",
         "A wolf cub was raised by a ewe and grew up gentle, and the sheep were safe from the wolves."]


def test_attribution_does_not_favour_the_persona_with_longer_lines():
    # as many lines each, but a tale holds five times the words of a bark: fit on lines, the
    # teller has seen every everyday word and takes a guard's line made of them
    teller = [("teller", t) for t in TALES]
    guard = [("guard", t) for t in ("Move along, citizen.", "Halt.", "Papers, citizen.", "Curfew at the bell.",
                                    "No loitering.", "Gate's shut, citizen.", "Keep walking.", "Back inside.")]
    painter = [("painter", ", ".join(f"tag{i}x{k}" for k in range(60))) for i in range(8)]  # a wide vocabulary
    nb = attribution_classifier(teller + guard + painter)
    assert predict(nb, "And then the man was in the town, citizen.") == "guard"
    assert predict(nb, "He was at the gate, citizen, and she was in the square.") == "guard"
    assert predict(nb, "Old Maren heard a song from the sea.") == "teller"


def test_split_beats_keeps_sentences_and_their_closing_quotes():
    story = 'Maren heard a voice.  She told no one!\nOne winter "it stopped." Then what'
    assert split_beats(story) == ["Maren heard a voice.", "She told no one!", 'One winter "it stopped."', "Then what"]


def write_personas(root: Path, base: Path) -> Path:
    root.mkdir()
    voices = {"elf": ("human", "trees"), "trader": ("friend", "silver")}
    for i, (pid, (w1, w2)) in enumerate(voices.items()):
        examples = "".join(f"  - {{speaker: Player, line: 'Question {j}?', reply: 'Ah {w1}, {w2} {j}.'}}\n"
                           for j in range(20))
        (root / f"{pid}.yaml").write_text(textwrap.dedent(f"""\
            id: {pid}
            display_name: {pid.title()}
            description: test persona
            system_prompt: You are {pid}.
            adapter: adapters/{pid}
            sampling: {{max_tokens: 6}}
            examples:
            """) + examples)
        write_lora(base, root / "adapters" / pid, rank=4, targets=["q_proj", "v_proj"], seed=i)
    return root


@pytest.fixture
def engine(tiny_model_dir):
    from npcd.engine.engine import Engine

    return Engine(engine_config(None, batch=8, adapters=2, threads=2).replace(base=str(tiny_model_dir),
                                                                              device="cpu"))


def test_reply_nll_matches_transformers(engine, tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.load_adapter("elf", str(tiny_adapters["elf"]))
    prompt, reply = [1, 520, 9531, 198, 57], [373, 301, 30219, 2]
    got = reply_nll(engine, [(prompt, reply, None), (prompt, reply, "elf")])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(tiny_adapters["elf"]))
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits[0]
        adapted_logits = model(ids).logits[0]
    for (total, count), logits in zip(got, (base_logits, adapted_logits)):
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        expected = -logp[torch.arange(len(reply)), torch.tensor(reply)].sum().item()
        assert count == len(reply) and math.isclose(total, expected, rel_tol=1e-3)


def test_evaluate_reports_every_adapted_persona(engine, tiny_model_dir, tmp_path):
    personas, errors = load_dir(write_personas(tmp_path / "personas", tiny_model_dir))
    assert not errors
    reports = evaluate(personas, engine)
    assert [r.persona.id for r in reports] == ["elf", "trader"]
    for r in reports:
        assert r.held_out == 3 and len(r.samples) == 3
        assert r.nll_base > 0 and r.nll_adapter > 0 and r.nll_base != r.nll_adapter
        assert 0 <= r.attribution <= 1
        assert all(guess in ("elf", "trader") for _, _, guess in r.samples)
    text = table(reports)
    assert text.count("\n") == 4 and "| elf | r4 q/v | 3 |" in text
    assert "Question 6?" in markdown(reports, "npcd eval", 1.0)


def test_the_offline_engine_takes_every_held_out_line_at_once():
    from npcd.tools.evaluate import engine_config

    config = engine_config(None, batch=2000, adapters=3, threads=0)
    assert config.max_batch_size == 1024 and config.max_queue >= 2000  # the rest wait, none is refused
