"""The story demo's parts: a story and its illustrations, from one base model (`npcd demo story`).

The storyteller turns the idea into a short story, streamed. The story is cut
into beats (sentences); then, in ONE mixed-adapter batch, every beat goes both
to the storyteller (to expand it) and to the image prompter (to turn it into a
Stable Diffusion XL prompt). All of those lines stream side by side: two
personas, two adapters, one batch, one copy of the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from npcd.personas.loader import Persona

_SENTENCE = re.compile(r"[^.!?]*[.!?]+[\"')\]]*|[^.!?]+$")


def split_beats(story: str) -> list[str]:
    """Sentences of the story, in order; a beat is one sentence."""
    return [s.strip() for s in _SENTENCE.findall(" ".join(story.split())) if len(s.strip()) > 1]


@dataclass
class Line:
    """One streamed reply: what has arrived so far and whether it is complete."""

    text: str = ""
    done: bool = False


def stream(engine, requests: list, lines: dict[str, Line], refresh) -> int:
    """Submits the requests together and steps the engine until all have finished.

    Returns the most requests that were decoded in one step.
    """
    from npcd.engine.api import Finished, TextDelta

    def sink(event) -> None:
        line = lines[event.request_id]
        if isinstance(event, TextDelta):
            line.text += event.text
        elif isinstance(event, Finished):
            line.text, line.done = event.text, True
            if event.error:
                line.text += f" [error: {event.error}]"

    for request in requests:
        engine.submit(request, sink)
    widest = 0
    while not all(lines[r.request_id].done for r in requests):
        if not engine.step() and not engine.has_work():
            break
        widest = max(widest, engine.stats().running)
        refresh()
    refresh()
    return widest


def request_for(builder, persona: Persona, request_id: str, line: str, seed: int, max_tokens: int | None):
    from npcd.engine.api import GenerationRequest

    prompt = builder.build(persona, speaker="Writer", line=line)
    sampling = persona.sampling_params(seed)
    if max_tokens is not None:
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, max_tokens))
    return GenerationRequest(request_id=request_id, prompt_ids=prompt.ids, sampling=sampling,
                             adapter=persona.id if persona.adapter_path else None, prefix_len=prompt.prefix_len)
