"""`npcd eval --actions`: does a structured line choose an action that fits the moment?

Each persona that declares actions carries labelled `situations` (a line said
to the NPC and the actions that fit it). The real engine answers every one as a
structured line, all personas in one mixed-adapter batch, with each persona's
adapter and sampling defaults; the share whose chosen action is among the
expected ones is the fit rate. Two baselines put it in proportion: `chance`
(a uniformly random action) and `majority` (always the action most often
expected for that persona).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from npcd.personas.actions import SAY_FIELD, menu
from npcd.personas.loader import Persona


@dataclass
class ActionReport:
    persona: Persona
    fit: float        # share of situations whose chosen action is expected
    chance: float     # expected fit of a uniformly random action
    majority: float   # fit of always choosing the most often expected action
    valid: float      # share of replies that parsed (the grammar makes this 1.0)
    samples: list[tuple[str, str, str, bool]]  # (line, spoken line, chosen action, fits)


def evaluate_actions(personas: dict[str, Persona], engine: Any, seed: int = 0) -> list[ActionReport]:
    import json

    from npcd.engine.api import GenerationRequest, StructuredOutput
    from npcd.personas.prompt import PromptBuilder

    acting = [p for p in personas.values() if p.actions and p.situations]
    if not acting:
        raise ValueError("no persona declares both actions and situations")
    builder = PromptBuilder(engine.tokenizer)
    requests, owners = [], []
    for p in acting:
        if p.adapter_path is not None and p.id not in engine.adapters():
            engine.load_adapter(p.id, str(p.adapter_path))
        options = menu(p.actions, p.emotions)
        structured = StructuredOutput(p.reply_schema(), SAY_FIELD)
        for i, situation in enumerate(p.situations):
            prompt = builder.build(p, speaker=situation.speaker, line=situation.line, context=situation.context,
                                   menu=options)
            requests.append(GenerationRequest(
                request_id=f"{p.id}/{i}", prompt_ids=prompt.ids, sampling=p.sampling_params(seed=seed * 100_003 + i),
                adapter=p.id if p.adapter_path is not None else None, prefix_len=prompt.prefix_len,
                structured=structured))
            owners.append((p, situation))
    finished = engine.generate(requests)
    reports = []
    for p in acting:
        samples, parsed = [], 0
        for (owner, situation), f in zip(owners, finished):
            if owner is not p:
                continue
            try:
                reply = json.loads(f.json)
                parsed += 1
            except json.JSONDecodeError:
                reply = {}
            name = (reply.get("action") or {}).get("name", "")
            samples.append((situation.line, f.text, name, name in situation.expect))
        expected = Counter(n for s in p.situations for n in s.expect)
        top = expected.most_common(1)[0][0]
        n = len(p.situations)
        reports.append(ActionReport(
            persona=p, fit=sum(ok for *_, ok in samples) / n,
            chance=sum(len(s.expect) for s in p.situations) / (n * len(p.actions)),
            majority=sum(top in s.expect for s in p.situations) / n, valid=parsed / n, samples=samples))
    return reports


def actions_table(reports: list[ActionReport]) -> str:
    head = ("| persona | actions | situations | valid JSON | action fits | chance | majority |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    rows = [f"| {r.persona.id} | {', '.join(a.name for a in r.persona.actions)} | {len(r.samples)} | "
            f"{r.valid:.0%} | {r.fit:.0%} | {r.chance:.0%} | {r.majority:.0%} |" for r in reports]
    return "\n".join([head, *rows])


def actions_markdown(reports: list[ActionReport], command: str, seconds: float) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = ["# Persona actions: evaluation", "",
             (f"Produced by `{command}` ({seconds:.0f} s on CPU). Each persona's labelled `situations` are "
              "answered as structured lines (grammar-constrained JSON: the line, an emotion, an action), every "
              "persona in one mixed-adapter batch with its adapter and sampling defaults. **action fits**: the "
              "share whose chosen action is one of the labelled ones; **chance**: a uniformly random action; "
              "**majority**: always the persona's most often labelled action."), "",
             actions_table(reports), "", "## Sample lines", "",
             "| persona | line | spoken | action | fits |", "|---|---|---|---|---|"]
    for r in reports:
        for line, said, action, ok in r.samples[:6]:
            parts.append(f"| {r.persona.id} | {cell(line)} | {cell(said)} | {action} | {'yes' if ok else 'no'} |")
    return "\n".join(parts) + "\n"
