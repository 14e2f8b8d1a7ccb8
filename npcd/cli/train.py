"""`npcd train PERSONA`: fine-tune a persona's LoRA adapter (the work is in npcd.tools.train)."""

from __future__ import annotations

import argparse
from pathlib import Path

from npcd.tools.train import MODULES, TrainConfig, find_persona, train_adapter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("persona", help="persona id")
    parser.add_argument("--personas", type=Path, default=Path("personas"), help="personas directory (default personas)")
    parser.add_argument("--base", default=defaults.base, help=f"base model (default {defaults.base})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--rank", type=int, default=defaults.rank, help=f"LoRA rank (default {defaults.rank})")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--targets", default=",".join(defaults.targets),
                        help=f"comma-separated modules to adapt (default {','.join(defaults.targets)}; "
                             f"any of {','.join(MODULES)}, or 'all')")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--top-layers", type=int, default=defaults.top_layers,
                        help=f"adapt only the top N decoder layers, 0 = all (default {defaults.top_layers})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of the training examples held back to pick the best step by their loss, "
                             f"0 = keep the last step (default {defaults.val_fraction})")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help=f"steps between validation losses (default {defaults.eval_every})")
    parser.add_argument("--save-dtype", default=defaults.save_dtype, choices=("bfloat16", "float32"))
    parser.add_argument("--out", type=Path, help="adapter directory (default: the persona's `adapter:`, "
                                                 "else adapters/<id> next to its file)")
    parser.add_argument("--plot", type=Path, help="loss curve PNG (default: loss.png in the adapter directory)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    persona = find_persona(args.personas, args.persona)
    targets = MODULES if args.targets == "all" else tuple(t.strip() for t in args.targets.split(",") if t.strip())
    config = TrainConfig(base=args.base, steps=args.steps, rank=args.rank,
                         alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, targets=targets,
                         lr=args.lr, batch_size=args.batch_size, top_layers=args.top_layers, seed=args.seed,
                         save_dtype=args.save_dtype, val_fraction=args.val_fraction,
                         eval_every=args.eval_every)
    config.validate()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out_dir = args.out or persona.adapter_path or persona.default_adapter_dir
    plot = args.plot or out_dir / "loss.png"
    result = train_adapter(persona, config, out_dir, plot)
    first, last = result.losses[0], sum(result.losses[-5:]) / len(result.losses[-5:])
    print(f"{persona.id}: {len(result.losses)} steps in {result.seconds:.0f} s, loss {first:.3f} -> {last:.3f}")
    if result.best_step is not None:
        print(f"kept step {result.best_step}: validation loss {result.val_losses[result.best_step]:.3f} "
              f"(first {next(iter(result.val_losses.values())):.3f})")
        if result.still_improving():
            print(f"validation loss was still falling at the last step: a longer run "
                  f"(e.g. --steps {len(result.losses) * 3 // 2}) may give a better adapter")
    print(f"adapter: {out_dir}\nloss curve: {plot}")
    if persona.adapter_path is None and args.out is None:
        rel = out_dir.relative_to(persona.source.parent)
        print(f"to use it, add this line to {persona.source.name}:  adapter: {rel}")
    return 0
