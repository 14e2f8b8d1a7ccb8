"""Where a decode step's time goes: base GEMMs, the LoRA operator, attention, the rest.

Runs the NVIDIA workload's decode (rank-64 adapters on every linear module,
one adapter per row, cycling over 8) at a batch size, profiles a few decode
steps with torch.profiler and groups operator time into buckets. The gap
between wall time and operator time is Python / dispatch overhead.

    python bench/profile_step.py --batch 32 [--adapters 8] [--no-lora]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from npcd.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from npcd.engine.config import EngineConfig  # noqa: E402
from npcd.engine.engine import Engine  # noqa: E402
from npcd.engine.testing import write_lora  # noqa: E402
from npcd.engine.weights import resolve_base  # noqa: E402

BUCKETS = {
    "base GEMMs (mm)": ("aten::mm", "aten::addmm"),
    "LoRA shrink/expand (bmm)": ("aten::bmm",),
    "LoRA routing (index_select/index_add)": ("aten::index_select", "aten::index_add_", "aten::scatter_add_"),
    "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_attention_math", "aten::_efficient_attention_forward"),
    "KV cache writes": ("aten::_index_put_impl_",),
    "norms / rope / activations": ("aten::_fused_rms_norm", "aten::mul", "aten::silu", "aten::add", "aten::cat",
                                   "aten::neg", "aten::pow", "aten::mean", "aten::rsqrt"),
}
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-lora", action="store_true")
    args = parser.parse_args()

    engine = Engine(EngineConfig(max_batch_size=args.batch, max_seq_len=256, max_resident_adapters=args.adapters))
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        bucket = next((b for b, ops in BUCKETS.items() if event.key in ops), "other operators")
        totals[bucket] += event.self_cpu_time_total / 1000 / args.steps
    op_ms = sum(totals.values())
    print(f"batch {args.batch}, {'no adapters' if args.no_lora else f'{args.adapters} adapters rank {args.rank}'}: "
          f"{wall_ms:.1f} ms per decode step (profiled)")
    for bucket, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {bucket:<40} {ms:7.1f} ms  {100 * ms / wall_ms:5.1f}%")
    print(f"  {'python / dispatch overhead':<40} {wall_ms - op_ms:7.1f} ms  {100 * (wall_ms - op_ms) / wall_ms:5.1f}%")


if __name__ == "__main__":
    main()
