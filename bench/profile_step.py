"""Where a decode step's time goes: the projections and LM head, the LoRA operator, attention, the rest.

Runs the NVIDIA workload's decode (rank-64 adapters on every linear module,
one adapter per row, cycling over 8) at a batch size, profiles a few decode
steps with cProfile and groups the time of the C++ calls (npcd's kernels, or
PyTorch's where the engine runs on them) into buckets. The rest of the wall
time is Python between them.

    python bench/profile_step.py --batch 32 [--adapters 8] [--no-lora] [--weights int4]

Why cProfile and not torch.profiler: npcd's kernels are extension functions, not
registered operators, so torch.profiler does not see them and reported ~90% of a
block-mode step as "dispatch overhead".
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npcd.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from npcd.engine.config import EngineConfig  # noqa: E402
from npcd.engine.engine import Engine  # noqa: E402
from npcd.engine.testing import write_lora  # noqa: E402
from npcd.engine.weights import resolve_base  # noqa: E402

# bucket -> the names of the C++ calls it holds (npcd's kernels first, then PyTorch's paths)
BUCKETS = {
    "projections + LM head": ("linear", "addmm", "mm", "_weight_int8pack_mm"),
    "LoRA operator": ("lora_add", "bmm", "index_select", "index_add_"),
    "attention": ("attention", "scaled_dot_product_attention"),
    "norms / activations": ("rms_norm", "add_rms_norm", "silu_mul", "silu", "rms_norm_"),
}


def bucket_of(name: str) -> str | None:
    """The bucket of a cProfile entry for a C++ call, None for Python code. Functions are named
    '<built-in method npcd_cpu_ab12.linear>', tensor methods "<method 'index_add_' of 'torch._C.TensorBase' objects>"."""
    if name.startswith("<method '"):
        short = name.split("'")[1]
    elif name.startswith("<built-in"):
        short = name.rstrip(">").split(" ")[-1].split(".")[-1]
    else:
        return None
    return next((b for b, names in BUCKETS.items() if short in names), "other C++ calls")


ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--weights", default="auto", help="the engine's weights mode (default: auto)")
    args = parser.parse_args()

    engine = Engine(EngineConfig(max_batch_size=args.batch, max_seq_len=256, max_resident_adapters=args.adapters,
                                 weights=args.weights))
    # The block modes run the layers in one C++ call (kernels/layers.cpp), which cProfile sees as one entry; the
    # Python loop makes the same kernel calls in the same order, one profiled entry each. cProfile's own cost per
    # call inflates "Python between the calls" (a batch-1 step profiles at 17-20 ms against 6-11 ms unprofiled).
    engine.model.layer_loop = None
    names: list[str | None] = [None]
    if not args.no_lora:
        base = resolve_base(engine.config.base)
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.adapters):
                engine.load_adapter(f"a{i}", str(write_lora(base, Path(tmp) / f"a{i}", args.rank, ALL_MODULES,
                                                            seed=i, std=0.01)))
        names = [f"a{i}" for i in range(args.adapters)]
    prompt = engine.tokenizer.encode("The merchant looks up from her scales and asks what the traveller needs.")
    for i in range(args.batch):
        engine.submit(GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=10 * args.steps, ignore_eos=True),
                                        adapter=names[i % len(names)]), lambda e: None)
    for _ in range(3):  # prefill, then warm decode steps
        engine.step()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    totals: dict[str, float] = defaultdict(float)
    for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        if (bucket := bucket_of(name)) is not None:
            totals[bucket] += tottime * 1000 / args.steps
    op_ms = sum(totals.values())
    print(f"batch {args.batch}, {'no adapters' if args.no_lora else f'{args.adapters} adapters rank {args.rank}'}, "
          f"weights {engine.describe()['weights']}: {wall_ms:.1f} ms per decode step (profiled)")
    for bucket, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {bucket:<40} {ms:7.1f} ms  {100 * ms / wall_ms:5.1f}%")
    print(f"  {'Python between the calls':<40} {wall_ms - op_ms:7.1f} ms  {100 * (wall_ms - op_ms) / wall_ms:5.1f}%")


if __name__ == "__main__":
    main()
