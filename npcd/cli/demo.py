"""`npcd demo story "an idea"`: a story and its illustrations in one mixed-adapter batch (npcd.tools.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from npcd.personas.loader import Persona, load_dir
from npcd.tools.demo import Line, request_for, split_beats, stream


def story(engine, storyteller: Persona, illustrator: Persona, idea: str, beats: int, seed: int, console,
          max_tokens: int | None = None) -> int:
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table

    from npcd.personas.prompt import PromptBuilder

    builder = PromptBuilder(engine.tokenizer)
    story_line = {"story": Line()}
    title = f"{storyteller.display_name} ({storyteller.id}): {idea}"
    with Live(console=console, refresh_per_second=8) as live:
        stream(engine, [request_for(builder, storyteller, "story", idea, seed, max_tokens)], story_line,
                lambda: live.update(Panel(story_line["story"].text or "...", title=title)))
    chosen = split_beats(story_line["story"].text)[:beats]
    if not chosen:
        console.print("[red]the storyteller produced no sentence to illustrate[/red]")
        return 1

    lines: dict[str, Line] = {}
    requests = []
    for i, beat in enumerate(chosen):
        for persona, kind in ((storyteller, "expand"), (illustrator, "image")):
            rid = f"{kind}-{i}"
            lines[rid] = Line()
            requests.append(request_for(builder, persona, rid, beat, seed + 1 + i, max_tokens))

    def render() -> Table:
        table = Table(title=f"{len(chosen)} beats x 2 personas: one mixed batch of {len(requests)} requests",
                      show_lines=True, expand=True)
        table.add_column("beat", ratio=2)
        table.add_column(f"{storyteller.display_name} ({storyteller.id})", ratio=4)
        table.add_column(f"{illustrator.display_name} ({illustrator.id})", ratio=4)
        for i, beat in enumerate(chosen):
            cells = [lines[f"{kind}-{i}"] for kind in ("expand", "image")]
            table.add_row(beat, *[(c.text or "...") + ("" if c.done else " ▌") for c in cells])
        return table

    with Live(render(), console=console, refresh_per_second=8) as live:
        widest = stream(engine, requests, lines, lambda: live.update(render()))
    stats = engine.stats()
    adapters = sorted({r.adapter for r in requests if r.adapter})
    console.print(f"[dim]{len(requests)} requests, adapters {', '.join(adapters) or 'none'}: up to {widest} "
                  f"decoded in the same step; "
                  f"{stats.tokens_generated} tokens generated in {stats.steps} engine steps[/dim]")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo", required=True, metavar="DEMO")
    p = sub.add_parser("story", help="tell a story from an idea, then expand and illustrate its beats in one batch")
    p.add_argument("idea", help="what the story is about, e.g. \"a lighthouse keeper hears singing\"")
    p.add_argument("--beats", type=int, default=3, help="how many sentences of the story to expand (default 3)")
    p.add_argument("--storyteller", default="storyteller", help="persona id that tells (default storyteller)")
    p.add_argument("--illustrator", default="image_prompter", help="persona id that writes image prompts")
    p.add_argument("--personas", type=Path, default=Path("personas"), help="personas directory (default personas)")
    p.add_argument("--engine", type=Path, help="engine definition (default: the embedded base, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-tokens", type=int, help="cap every line at this many tokens (default: the personas')")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from npcd.engine.engine import Engine
    from npcd.tools.evaluate import engine_config

    if args.beats < 1:
        raise ValueError(f"--beats must be >= 1, got {args.beats}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.idea.strip():
        raise ValueError("the idea must not be empty")
    personas, errors = load_dir(args.personas)
    for name in (args.storyteller, args.illustrator):
        if name not in personas:
            why = "; ".join(str(e) for e in errors) or "no such persona"
            raise ValueError(f"persona {name!r} is not available in {args.personas}: {why}")
    storyteller, illustrator = personas[args.storyteller], personas[args.illustrator]
    engine = Engine(engine_config(args.engine, batch=2 * args.beats, adapters=2, threads=args.threads))
    for persona in (storyteller, illustrator):
        if persona.adapter_path is not None:
            engine.load_adapter(persona.id, str(persona.adapter_path))
    return story(engine, storyteller, illustrator, args.idea, args.beats, args.seed, Console(),
                 args.max_tokens)
