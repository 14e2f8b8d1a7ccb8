"""What grammar-constrained decoding costs per decode step, all rows constrained against none.

The engine as `npcd serve` runs it (engines/default.yaml, the embedded model, weights as `auto` picks),
the shipped merchant persona and its adapter, B rows decoding together. For each batch size it times the
decode steps (steps that prefill nothing, with all B rows running) of

  free        B free-text lines
  structured  B structured lines under the merchant's reply grammar (say, emotion, action with arguments)

and prints the median step times, the ratio, and the share of the structured step spent filling and
applying token masks (Constrainer.apply, timed in place). Target: structured <= 1.10x free.

Both runs use the same prompts (the action menu included) and the free lines ignore EOS, so both decode at
the same context lengths: the k-th steps of the two runs are compared, for as many steps as both keep all
B rows running.

    python bench/grammar_mask.py             # batches 8 and 32, 3 rounds each
    python bench/grammar_mask.py --rounds 1  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from npcd.engine.api import GenerationRequest, StructuredOutput
from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine
from npcd.personas.actions import SAY_FIELD, menu
from npcd.personas.loader import load_persona
from npcd.personas.prompt import PromptBuilder

ROOT = Path(__file__).resolve().parents[1]
LINES = ["I'll take the rope.", "How much for the sword?", "Buy my old boots?", "Who are you?"]


def decode_steps(engine: Engine, requests: list[GenerationRequest], mask_time: list[float]) -> list[float]:
    """Seconds of every decode-only step with all rows running; mask_time gets each step's masking seconds."""
    for r in requests:
        engine.submit(r, lambda event: None)
    times = []
    while engine.has_work():
        prefilled, masked_before = engine.runner.prompt_tokens, _MASK[0]
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if engine.runner.prompt_tokens == prefilled and len(engine.running) == len(requests):
            times.append(elapsed)
            mask_time.append(_MASK[0] - masked_before)
    return times


_MASK = [0.0]


def timed_masks(engine: Engine) -> None:
    apply = engine.postprocessor.constrainer.apply

    def timed(logits, grammars):
        start = time.perf_counter()
        apply(logits, grammars)
        _MASK[0] += time.perf_counter() - start
    engine.postprocessor.constrainer.apply = timed  # type: ignore[method-assign]


def lines(engine: Engine, persona, kind: str, batch: int, round_: int, tokens: int,
          structured: StructuredOutput | None) -> list[GenerationRequest]:
    """B merchant lines, the action menu in every prompt; free lines ignore EOS and stop strings."""
    prompts = PromptBuilder(engine.tokenizer)
    options = menu(persona.actions, persona.emotions)
    out = []
    for i in range(batch):
        p = prompts.build(persona, speaker="Player", line=LINES[i % len(LINES)], menu=options)
        sampling = persona.sampling_params(seed=i, overrides={"max_tokens": tokens})
        if structured is None:
            sampling = dataclasses.replace(sampling, ignore_eos=True, stop=())
        out.append(GenerationRequest(f"{kind}{round_}-{i}", p.ids, sampling, adapter=persona.id,
                                     prefix_len=p.prefix_len, structured=structured))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of each line (the spoken part)")
    args = parser.parse_args()
    engine = Engine(EngineConfig.from_yaml(ROOT / "engines" / "default.yaml"))
    persona = load_persona(ROOT / "personas" / "merchant.yaml")
    engine.load_adapter(persona.id, str(persona.adapter_path))
    timed_masks(engine)
    structured = StructuredOutput(persona.reply_schema(), SAY_FIELD)
    print(f"weights {engine.placement.weights} ({engine.placement.reason}); threads {engine.describe()['threads']}")
    print(f"{'batch':>5} {'free ms':>8} {'structured ms':>14} {'ratio':>6} {'mask ms':>8} {'mask share':>10}")
    for batch in [int(b) for b in args.batches.split(",")]:
        free_ms, structured_ms, masks = [], [], []
        for round_ in range(args.rounds):
            free = decode_steps(engine, lines(engine, persona, "free", batch, round_, args.tokens, None), [])
            round_masks: list[float] = []
            constrained = decode_steps(engine, lines(engine, persona, "structured", batch, round_, args.tokens,
                                                     structured), round_masks)
            steps = min(len(free), len(constrained))
            free_ms += free[:steps]
            structured_ms += constrained[:steps]
            masks += round_masks[:steps]
        f, s, m = (statistics.median(x) * 1000 for x in (free_ms, structured_ms, masks))
        print(f"{batch:>5} {f:>8.1f} {s:>14.1f} {s / f:>6.2f} {m:>8.2f} {m / s:>10.1%}")


if __name__ == "__main__":
    main()
