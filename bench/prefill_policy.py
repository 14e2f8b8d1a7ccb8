"""The three prefill policies under staggered game-tick arrivals.

A game sends a few new lines every tick while others are mid-sentence. With
`eager`, every step that finds newcomers prefills them, so running lines stall
for as long as arrivals continue; with `alternate`, a prefill step is always
followed by a decode step; with `mixed`, one forward decodes the running lines
and prefills the newcomers together. Here new requests arrive before every
engine step, the worst case for eager. This prints time to first token, the
longest gap between two tokens of a running line, and throughput for each,
and their ratios to `alternate`.

    python bench/prefill_policy.py [--requests 48] [--per-step 2] [--tokens 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npcd.engine.api import Finished, GenerationRequest, SamplingParams, TextDelta  # noqa: E402
from npcd.engine.config import PREFILL_POLICIES, EngineConfig  # noqa: E402
from npcd.engine.engine import Engine  # noqa: E402


def run(policy: str, args: argparse.Namespace) -> dict[str, float]:
    engine = Engine(EngineConfig(max_batch_size=32, max_seq_len=256, prefill_policy=policy))
    prompt = engine.tokenizer.encode("The guard squints at the stranger by the gate and asks what brings them "
                                     "to the city at this late hour, in the rain.")
    last_token: dict[str, float] = {}
    gaps: list[float] = []
    ttft: list[float] = []

    def sink(event) -> None:
        now = time.perf_counter()
        if isinstance(event, (TextDelta, Finished)) and event.request_id in last_token:
            gaps.append(now - last_token[event.request_id])
        if isinstance(event, TextDelta):
            last_token[event.request_id] = now
        if isinstance(event, Finished):
            ttft.append(event.first_token_ms)

    submitted = 0
    start = time.perf_counter()
    while submitted < args.requests or engine.has_work():
        for _ in range(min(args.per_step, args.requests - submitted)):
            engine.submit(GenerationRequest(f"r{submitted}", prompt, SamplingParams(max_tokens=args.tokens,
                                                                                     ignore_eos=True)), sink)
            submitted += 1
        engine.step()
    wall = time.perf_counter() - start
    ttft.sort()
    return {"ttft_mean_ms": statistics.mean(ttft), "ttft_p99_ms": ttft[int(0.99 * (len(ttft) - 1))],
            "max_gap_ms": 1000 * max(gaps), "tokens_per_s": args.requests * args.tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--per-step", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    results = {policy: run(policy, args) for policy in PREFILL_POLICIES}
    print(f"{'policy':<10} {'TTFT mean':>10} {'TTFT p99':>10} {'max gap':>10} {'tok/s':>8}")
    for policy, r in results.items():
        print(f"{policy:<10} {r['ttft_mean_ms']:>8.0f}ms {r['ttft_p99_ms']:>8.0f}ms {r['max_gap_ms']:>8.0f}ms "
              f"{r['tokens_per_s']:>8.1f}")
    a = results["alternate"]
    for policy, r in results.items():
        if policy != "alternate":
            print(f"{policy}/alternate: TTFT p99 x{r['ttft_p99_ms'] / a['ttft_p99_ms']:.2f}, "
                  f"max gap x{r['max_gap_ms'] / a['max_gap_ms']:.2f}, "
                  f"throughput x{r['tokens_per_s'] / a['tokens_per_s']:.2f}")

if __name__ == "__main__":
    main()
