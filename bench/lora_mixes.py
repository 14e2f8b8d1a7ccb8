"""The mixed-adapter LoRA operator's step time over adapter mixes, against the base GEMMs and the padded grouping.

One step = every add_delta of a forward pass: 30 layers x 4 groups (qkv, o, gate_up, down) at SmolLM2-135M
shapes, rank 64 on all seven modules, 8 resident adapters. For each mix it reports, measured in this run:

  base      the no-adapter step's GEMMs: F.linear of the fused projections at the same shapes
  lora      LoraBatch as served (buckets planned by split_cost_rows)
  padded    LoraBatch with one bucket padded to the longest segment (the grouping before buckets)
  segments  LoraBatch with every segment its own bucket (one matmul per adapter, no padding)

with LoRA / base ratios, the useful GFLOP/s (2 * rows with an adapter * R * (members * in + out) per group,
padding not counted) and the rate at which the present adapters' weights stream (each is read once per step).

Timing: medians over repetitions (the systems' order rotated) of CPU time (time.process_time), which leaves
out time the process waits for a core on a shared machine; the wall-time lora/base ratio is printed too, and
the load average before and after. Checks first that the three plans give the same deltas. 1 thread: on the
shared 2-core dev box two OpenMP threads waited on each other (a 576x3072 GEMM ran 6x slower at load 6);
--threads 2 measures that (CPU time then sums both threads: compare the wall ratio).

    python bench/lora_mixes.py            # batches 1, 8, 32 + prompts of 43 and 300 tokens, 7 reps (~3 min)
    python bench/lora_mixes.py --quick    # fewer mixes, one 43-token prompt, 3 reps (~25 s)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npcd.engine.lora import GROUPS, GatherCache, LoraBatch, LoraStacks

HIDDEN, INTERMEDIATE, LAYERS, ADAPTERS, RANK = 576, 1536, 30, 8, 64
SHAPES = {"q_proj": (HIDDEN, 576), "k_proj": (HIDDEN, 192), "v_proj": (HIDDEN, 192), "o_proj": (576, HIDDEN),
          "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
          "down_proj": (INTERMEDIATE, HIDDEN)}
FAN_IN = {g: SHAPES[members[0]][0] for g, members in GROUPS.items()}
FAN_OUT = {g: sum(SHAPES[m][1] for m in members) for g, members in GROUPS.items()}
PLANS = {"lora": None, "padded": 1e9, "segments": 0.0}  # split_cost: measured rule, dearer than any padding, free


def lora_flops(real_rows: int) -> int:
    """Useful FLOPs of one step's deltas: shrink and expand of every member, rows with an adapter only."""
    per_row = sum(len(GROUPS[g]) * FAN_IN[g] + FAN_OUT[g] for g in GROUPS) * RANK
    return 2 * real_rows * per_row * LAYERS


def base_flops(rows: int) -> int:
    return 2 * rows * sum(FAN_IN[g] * FAN_OUT[g] for g in GROUPS) * LAYERS


def weight_bytes(present: int) -> int:
    """Bytes of the present adapters' A and B over a step: what decode streams from memory."""
    return 4 * present * sum(RANK * (len(GROUPS[g]) * FAN_IN[g] + FAN_OUT[g]) for g in GROUPS) * LAYERS


def cycling(n: int) -> list[int]:
    return [i % ADAPTERS for i in range(n)]


def skewed(n: int) -> list[int]:
    """One adapter on most rows, up to 7 others on one row each (25 + 7 at 32 rows)."""
    others = min(ADAPTERS - 1, n // 4)
    return [0] * (n - others) + list(range(1, others + 1))


def mixes(batches: tuple[int, ...], prompts: tuple[int, ...], seed: int = 0) -> dict[str, list[int]]:
    """Name -> each token row's adapter slot (-1 none), decode rows first then prompt rows, as the runner lays them."""
    rng = random.Random(seed)
    zipf = [1 / (k + 1) ** 1.2 for k in range(ADAPTERS)]
    out: dict[str, list[int]] = {}
    for n in batches:
        out[f"identical x{n}"] = [3] * n
        if n > 1:
            out[f"cycling x{n}"] = cycling(n)
            out[f"uniform x{n}"] = rng.choices(range(ADAPTERS), k=n)
            out[f"zipf x{n}"] = rng.choices(range(ADAPTERS), weights=zipf, k=n)
            out[f"skewed x{n}"] = skewed(n)
            out[f"half none x{n}"] = [-1 if i % 2 else s for i, s in enumerate(cycling(n))]
    for length in prompts:
        for n in (1, 8):
            out[f"{n} decode + {length}-tok prompt"] = cycling(n) + [2] * length
    return out


def timed(fn: Callable[[], None], into: dict[str, list[float]]) -> None:
    """Runs fn once, appending its CPU and wall seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    into["cpu"].append(time.process_time() - cpu)
    into["wall"].append(time.perf_counter() - wall)


@dataclass
class Row:
    mix: str
    rows: int
    real: int
    run_rows: int
    padded_run_rows: int
    ms: dict[str, float]       # system -> median CPU ms
    wall_ms: dict[str, float]  # system -> median wall ms
    buckets: int               # of the served plan
    present: int


def random_stacks(gen: torch.Generator) -> LoraStacks:
    stacks = LoraStacks(SHAPES, LAYERS, ADAPTERS, torch.float32, torch.device("cpu"))
    for slot in range(ADAPTERS):
        stacks.write(slot, {(layer, m): (torch.randn(RANK, fan_in, generator=gen) * fan_in ** -0.5,
                                         torch.randn(fan_out, RANK, generator=gen) * 0.01)
                            for layer in range(LAYERS) for m, (fan_in, fan_out) in SHAPES.items()})
    return stacks


def measure(name: str, row_slots: list[int], stacks: LoraStacks, base_w: list[dict[str, torch.Tensor]],
            reps: int, gen: torch.Generator) -> Row:
    n = len(row_slots)
    xs = {g: torch.randn(n, FAN_IN[g], generator=gen) for g in GROUPS}
    outs = {g: torch.zeros(n, FAN_OUT[g]) for g in GROUPS}
    plans = {plan: LoraBatch(row_slots, stacks, GatherCache(), split_cost) for plan, split_cost in PLANS.items()}

    def lora_step(batch: LoraBatch) -> Callable[[], None]:
        def run() -> None:
            for layer in range(LAYERS):
                for g in GROUPS:
                    batch.add_delta(xs[g], outs[g], layer, g)
        return run

    def base_step() -> None:
        for layer in range(LAYERS):
            for g in GROUPS:
                F.linear(xs[g], base_w[layer][g])

    for g in GROUPS:  # the plans must agree before their times mean anything
        deltas = []
        for batch in plans.values():
            deltas.append(torch.zeros(n, FAN_OUT[g]))
            batch.add_delta(xs[g], deltas[-1], 0, g)
        for d in deltas[1:]:
            torch.testing.assert_close(d, deltas[0], rtol=1e-4, atol=1e-5)
    systems = {"base": base_step} | {plan: lora_step(batch) for plan, batch in plans.items()}
    times = {s: {"cpu": [], "wall": []} for s in systems}
    for fn in systems.values():
        fn()  # warm-up: first-touch pages, gathered weights
    order = list(systems)
    for rep in range(reps):  # rotated, so no system always runs first or after the base GEMMs
        for s in order[rep % len(order):] + order[:rep % len(order)]:
            timed(systems[s], times[s])
    return Row(name, n, sum(s >= 0 for s in row_slots), plans["lora"].run_rows, plans["padded"].run_rows,
               {s: statistics.median(t["cpu"]) * 1e3 for s, t in times.items()},
               {s: statistics.median(t["wall"]) * 1e3 for s, t in times.items()},
               len(plans["lora"].buckets), len({s for s in row_slots if s >= 0}))


def print_table(rows: list[Row]) -> None:
    head = (f"{'mix':25} {'rows':>4} {'real':>4} {'bk':>2} {'run':>9} {'base ms':>7} {'lora ms':>7} {'pad ms':>7} "
            f"{'seg ms':>7} {'lora/base':>9} {'pad/base':>8} {'pad/lora':>8} {'seg/lora':>8} {'GFLOP/s':>7} "
            f"{'w GB/s':>6} {'base GF/s':>9} {'wall l/b':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = r.ms
        print(f"{r.mix:25} {r.rows:4d} {r.real:4d} {r.buckets:2d} {r.run_rows:4d}/{r.padded_run_rows:<4d} "
              f"{ms['base']:7.1f} {ms['lora']:7.1f} {ms['padded']:7.1f} {ms['segments']:7.1f} "
              f"{ms['lora'] / ms['base']:9.2f} {ms['padded'] / ms['base']:8.2f} {ms['padded'] / ms['lora']:8.2f} "
              f"{ms['segments'] / ms['lora']:8.2f} {lora_flops(r.real) / ms['lora'] / 1e6:7.1f} "
              f"{weight_bytes(r.present) / ms['lora'] / 1e6:6.1f} {base_flops(r.rows) / ms['base'] / 1e6:9.1f} "
              f"{r.wall_ms['lora'] / r.wall_ms['base']:8.2f}")
    print("bk: buckets of the served plan; run: rows its matmuls run / one padded bucket's; ms: median CPU ms per "
          "step; GFLOP/s, w GB/s: the served plan's useful FLOPs and adapter weights per CPU second; "
          "base GF/s: the base GEMMs'; wall l/b: lora/base in wall time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer mixes, 3 repetitions")
    ap.add_argument("--reps", type=int, help="repetitions per system and mix (default 7, --quick 3)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    batches, prompts = ((1, 8, 32), (43,)) if args.quick else ((1, 8, 32), (43, 300))
    all_mixes = mixes(batches, prompts)
    if args.quick:
        all_mixes = {k: v for k, v in all_mixes.items() if not k.startswith(("uniform", "half none"))}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {reps} reps, rank {RANK} on all modules, "
          f"{ADAPTERS} adapters, {LAYERS} layers x {len(GROUPS)} groups; load average {os.getloadavg()}")
    gen = torch.Generator().manual_seed(0)
    stacks = random_stacks(gen)
    base_w = [{g: torch.randn(FAN_OUT[g], FAN_IN[g], generator=gen) * FAN_IN[g] ** -0.5 for g in GROUPS}
              for _ in range(LAYERS)]
    rows = []
    for name, row_slots in all_mixes.items():
        rows.append(measure(name, row_slots, stacks, base_w, reps, gen))
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in rows[-1].ms.items()), flush=True)
    print()
    print_table(rows)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
