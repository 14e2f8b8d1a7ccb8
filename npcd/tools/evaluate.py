"""`npcd eval`: do the adapters give each persona its voice, on lines they never saw?

Two measures, both on each persona's held-out examples (15%, never trained on):

* NLL: mean negative log-likelihood per reply token of the held-out replies,
  base model + system prompt versus adapter + system prompt. Lower means the
  adapter finds the persona's real lines more likely.
* Attribution: the real engine generates a reply to every held-out line, all
  personas in one mixed-adapter batch, and a naive Bayes classifier fitted on
  the personas' *training* replies names the persona it thinks spoke. A
  recognisable voice is one the classifier gets right. The classifier is
  scikit-learn's, an optional extra: `pip install 'npcd[eval]'`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from npcd.personas.loader import Persona

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

_WORD = re.compile(r"[a-z']+|[0-9]+|[^\sa-z0-9]")


def features(text: str) -> list[str]:
    """Words, word pairs and punctuation: enough to tell a sales pitch from a threat."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _feature_counts(texts: Iterable[str]) -> list[Counter[str]]:
    """The classifier's first step: texts to the feature counts its vectorizer reads."""
    return [Counter(features(text)) for text in texts]


def attribution_classifier(labelled: Iterable[tuple[str, str]]) -> Pipeline:
    """Multinomial naive Bayes with add-one smoothing over `features`, fit on balanced classes.

    Every persona contributes the same amount of text (the features of its first
    lines, up to the smallest persona's total) and the prior is uniform. Balancing
    lines is not enough: a storyteller's five-sentence tales hold five times the
    words of a guard's bark, so the storyteller has seen far more everyday words
    and wins any line made mostly of them.

    The pipeline takes texts (`predict(["Move along."])`). Its counting step is
    not fitted: the rest is fitted on one feature count per persona, because the
    budget may end inside a line, which no fit on whole texts can express.
    """
    try:
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.naive_bayes import MultinomialNB
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer
    except ImportError as exc:
        raise ModuleNotFoundError("npcd eval's attribution classifier needs scikit-learn; "
                                  "install it with: pip install 'npcd[eval]'", name="sklearn") from exc
    feats: dict[str, list[str]] = {}
    for label, text in labelled:
        feats.setdefault(label, []).extend(features(text))
    if len(feats) < 2:
        raise ValueError("attribution needs at least two personas with examples")
    budget = min(len(f) for f in feats.values())
    pipeline = make_pipeline(FunctionTransformer(_feature_counts), DictVectorizer(),
                             MultinomialNB(alpha=1.0, fit_prior=False))
    pipeline[1:].fit([Counter(f[:budget]) for f in feats.values()], list(feats))
    return pipeline


@dataclass
class PersonaReport:
    persona: Persona
    adapter: str
    held_out: int
    nll_base: float
    nll_adapter: float
    attribution: float
    samples: list[tuple[str, str, str]]  # (line, generated reply, predicted persona)

    @property
    def reduction(self) -> float:
        return (self.nll_base - self.nll_adapter) / self.nll_base


def reply_nll(engine, items: Sequence[tuple[list[int], list[int], str | None]]) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reply given its prompt, scored in mixed-adapter batches."""
    import torch

    out = []
    size = min(engine.kv.slots, 8)  # logits of every position over the whole vocabulary add up fast
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        logits = engine.score([p + r for p, r, _ in chunk], [a for _, _, a in chunk])
        for (prompt, reply, _), lg in zip(chunk, logits):
            pred = torch.log_softmax(lg[len(prompt) - 1: len(prompt) + len(reply) - 1].float(), dim=-1)
            nll = -pred.gather(1, torch.tensor(reply, device=pred.device)[:, None]).sum().item()
            out.append((nll, len(reply)))
    return out


def evaluate(personas: dict[str, Persona], engine, seed: int = 0) -> list[PersonaReport]:
    from npcd.engine.api import GenerationRequest
    from npcd.personas.prompt import PromptBuilder

    builder = PromptBuilder(engine.tokenizer)
    classifier = attribution_classifier((p.id, e.reply) for p in personas.values() for e in p.train_examples)
    adapted = [p for p in personas.values() if p.adapter_path is not None and p.held_out_examples]
    if not adapted:
        raise ValueError("no persona has both an adapter and held-out examples")
    for p in adapted:
        engine.load_adapter(p.id, str(p.adapter_path))

    pairs = {p.id: [builder.training_pair(p, e) for e in p.held_out_examples] for p in adapted}
    items = [(prompt, reply, adapter) for p in adapted for prompt, reply in pairs[p.id] for adapter in (None, p.id)]
    nll = iter(reply_nll(engine, items))

    requests, owners = [], []
    for p in adapted:
        for i, ex in enumerate(p.held_out_examples):
            prompt = builder.build(p, speaker=ex.speaker, line=ex.line, context=ex.context)
            requests.append(GenerationRequest(request_id=f"{p.id}/{i}", prompt_ids=prompt.ids,
                                              sampling=p.sampling_params(seed=seed * 100_003 + i),
                                              adapter=p.id, prefix_len=prompt.prefix_len))
            owners.append((p.id, ex.line))
    finished = engine.generate(requests)  # every persona's lines in one mixed-adapter batch
    guesses = classifier.predict([f.text for f in finished])

    reports = []
    for p in adapted:
        sums = {None: [0.0, 0], p.id: [0.0, 0]}
        for _ in pairs[p.id]:
            for adapter in (None, p.id):
                total, count = next(nll)
                sums[adapter][0] += total
                sums[adapter][1] += count
        samples = [(line, f.text.strip(), str(guess))
                   for (owner, line), f, guess in zip(owners, finished, guesses) if owner == p.id]
        correct = sum(1 for _, _, guess in samples if guess == p.id)
        info = engine.adapters()[p.id]
        reports.append(PersonaReport(
            persona=p, adapter=f"r{info.rank} {'/'.join(m.removesuffix('_proj') for m in info.target_modules)}",
            held_out=len(samples), nll_base=sums[None][0] / sums[None][1],
            nll_adapter=sums[p.id][0] / sums[p.id][1], attribution=correct / len(samples), samples=samples))
    return reports


def table(reports: list[PersonaReport]) -> str:
    head = ("| persona | adapter | held-out | NLL base | NLL adapter | NLL reduction | attribution |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    rows = [f"| {r.persona.id} | {r.adapter} | {r.held_out} | {r.nll_base:.3f} | {r.nll_adapter:.3f} | "
            f"{r.reduction:.1%} | {r.attribution:.0%} |" for r in reports]
    n = sum(r.held_out for r in reports)
    overall = sum(r.attribution * r.held_out for r in reports) / n
    rows.append(f"| **all** | | {n} | | | min {min(r.reduction for r in reports):.1%} | {overall:.0%} |")
    return "\n".join([head, *rows])


def markdown(reports: list[PersonaReport], command: str, seconds: float) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = [
        "# Persona adapters: evaluation",
        "",
        f"Produced by `{command}` ({seconds:.0f} s on CPU). Every number is measured on each persona's "
        "held-out examples (15%, never trained on and never shown as demonstrations).",
        "",
        "* **NLL**: mean negative log-likelihood (nats) per token of the held-out replies, given the persona's "
        "full prompt (system prompt + user turn): base model alone vs base model + the persona's adapter, "
        "scored by the engine in mixed-adapter batches.",
        "* **attribution**: the engine generates a reply to every held-out line, with each persona's adapter and "
        "sampling defaults, all personas in one mixed batch; a multinomial naive Bayes classifier over words and "
        "word pairs, fitted on the personas' training replies (the same amount of text from each, uniform "
        "prior), names the speaker. The share named correctly.",
        "",
        "Targets: NLL reduction of at least 20% for every persona; attribution of at least 80%.",
        "",
        table(reports),
        "",
        "## Generated lines (first three held-out lines per persona)",
        "",
        "| persona | line | generated reply | classified as |",
        "|---|---|---|---|",
    ]
    for r in reports:
        for line, reply, guess in r.samples[:3]:
            parts.append(f"| {r.persona.id} | {cell(line)} | {cell(reply)} | {guess} |")
    parts += ["", "## How the adapters were trained", "",
              "From each adapter's `training.json`; `npcd train ID` with these options reproduces it.", "",
              "| persona | command | examples | loss first -> last 5 | kept step (validation loss) |",
              "|---|---|---:|---|---|"]
    for r in reports:
        record_file = r.persona.adapter_path / "training.json"
        if not record_file.is_file():
            parts.append(f"| {r.persona.id} | (no training.json) | | | |")
            continue
        t = json.loads(record_file.read_text())
        losses = t["losses"]
        command = (f"`npcd train {r.persona.id} --steps {t['steps']} --rank {t['rank']} --alpha {t['alpha']:g} "
                   f"--targets {','.join(t['targets'])} --lr {t['lr']:g} --batch-size {t['batch_size']} "
                   f"--top-layers {t['top_layers']} --seed {t['seed']}"
                   # adapters trained before early stopping existed used every example and kept the last step
                   f" --val-fraction {t.get('val_fraction', 0):g}"
                   + (f" --eval-every {t['eval_every']}" if t.get("val_fraction") else "") + "`")
        best = t.get("best_step")
        kept = f"{best} of {t['steps']} ({t['val_losses'][str(best)]:.2f})" if best else f"last ({t['steps']})"
        parts.append(f"| {r.persona.id} | {command} | {t['train_examples']} | "
                     f"{losses[0]:.2f} -> {sum(losses[-5:]) / len(losses[-5:]):.2f} | {kept} |")
    return "\n".join(parts) + "\n"


def engine_config(path: Path | None, *, batch: int, adapters: int, threads: int):
    """The engine for offline runs: fp32 on CPU unless a definition says otherwise.

    Offline jobs submit everything at once, so there is a slot (or, past 1024, a
    queue place) for every request and room for every adapter.
    """
    from npcd.engine.config import EngineConfig

    config = EngineConfig.from_yaml(path) if path else EngineConfig(weights="fp32")
    return config.replace(max_batch_size=max(config.max_batch_size, min(batch, 1024)),
                          max_queue=max(config.max_queue, batch),
                          max_resident_adapters=max(config.max_resident_adapters, adapters),
                          max_seq_len=min(config.max_seq_len, 384), threads=threads or config.threads)
