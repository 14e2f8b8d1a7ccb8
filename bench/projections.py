"""One decode step's projection GEMMs, per kernel, on this machine: why `weights: auto` picks what it picks.

All 210 projection GEMMs of a SmolLM2-135M step (30 layers of q/k/v fused, o, gate/up fused, down), on
random weights of the real shapes, at M = 1, 8 and 32 rows; best of a few runs of 5 steps each. Prints ms
per step and the weight bytes read per second against the stream bandwidth measured in the same run.

    python bench/projections.py            # ~1 minute
    python bench/projections.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multilora import machine_limits  # noqa: E402

from npcd.engine.kernels import build_cpu_kernels, load_cpu_kernels, runnable_isa_levels, why_unavailable  # noqa: E402
from npcd.engine.quant import BlockLinear, quantize_q4_1, quantize_q8_0  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer
LAYERS = 30


def best_ms(step: Callable[[], None], repeats: int = 5, steps: int = 5) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = machine_limits(torch.get_num_threads())
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"stream {limits['stream_gb_s']:.1f} GB/s, fp32 GEMM {limits['gemm_gflop_s']:.0f} GFLOP/s")
    torch.manual_seed(0)
    dense = [[torch.randn(o, i) * 0.02 for o, i in SHAPES] for _ in range(LAYERS)]

    # name -> (per-layer callables, weight bytes of one step)
    kernels: dict[str, tuple[list[list[Callable[[torch.Tensor], torch.Tensor]]], int]] = {}

    def add(name: str, make: Callable[[torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], int]]) -> None:
        built = [[make(w) for w in layer] for layer in dense]
        kernels[name] = ([[f for f, _ in layer] for layer in built], sum(n for layer in built for _, n in layer))

    add("fp32 F.linear", lambda w: (lambda x, w=w: F.linear(x, w), w.numel() * 4))
    bf = {id(w): w.bfloat16() for layer in dense for w in layer}
    add("bf16 F.linear", lambda w: (lambda x, w=bf[id(w)]: F.linear(x.bfloat16(), w), w.numel() * 2))

    def int8pack(w: torch.Tensor):
        scales = w.abs().amax(1) / 127
        q = (w / scales[:, None]).round().to(torch.int8)
        return (lambda x, q=q, s=scales.bfloat16(): torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s),
                q.numel() + scales.numel() * 2)

    add("torch _weight_int8pack_mm (bf16 act)", int8pack)
    if load_cpu_kernels() is None:
        print(f"npcd block kernel unavailable: {why_unavailable()}")
    else:
        # every build this CPU runs (on an AVX-512 VNNI machine, the AVX2 build too): what the wider path buys
        builds = [b for b in map(build_cpu_kernels, runnable_isa_levels()) if b is not None]
        for build in reversed(builds):
            path = build.module.path().split(",")[0]
            for mode, quantize in (("int4", quantize_q4_1), ("int8", quantize_q8_0)):
                def make(w: torch.Tensor, quantize=quantize, build=build):
                    linear = BlockLinear(quantize(w), build)
                    return linear, linear.nbytes
                add(f"npcd {quantize.__name__.removeprefix('quantize_')} {path} ({mode})", make)

    print(f"\n{'kernel':<40}" + "".join(f"{'M=' + str(m):>22}" for m in (1, 8, 32)))
    for name, (layers, nbytes) in kernels.items():
        cells = []
        for m in (1, 8, 32):
            xs = [torch.randn(m, i) for _, i in SHAPES]

            def step(layers=layers, xs=xs) -> None:
                for layer in layers:
                    for f, x in zip(layer, xs):
                        f(x)
            ms = best_ms(step)
            cells.append(f"{ms:7.1f} ms {nbytes / ms / 1e6:5.1f} GB/s")
        print(f"{name:<40}" + "".join(f"{c:>22}" for c in cells))
    print(f"(GB/s: weight bytes read per second; the machine streams {limits['stream_gb_s']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
