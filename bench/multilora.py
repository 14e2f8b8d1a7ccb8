"""Multi-LoRA serving benchmark: npcd against transformers + PEFT, same machine, same run.

The workload follows NVIDIA's multi-LoRA chart for RTX PCs: 43 prompt tokens,
100 output tokens, LoRA rank 64 on every linear module, each request of a
batch on a different adapter (8 adapters, cycling), batch sizes 1..32.

Systems (all measured in this run, on the same machine):
  peft_serial  transformers + PEFT, one request at a time, set_adapter() per request
  peft_mixed   PEFT's mixed-adapter batch: one generate() with adapter_names=
  hf_generate  transformers.generate, batch 1, no adapter (the single-stream reference)
  npcd_base_<weights>   our engine, no adapters, per `weights:` mode (int4, fp32, ...; --npcd-weights)
  npcd_mixed_<weights>  our engine, one adapter per row, 8 adapters cycling
  llamacpp_*   llama.cpp on the bundled Q4_1 GGUF (bench/peers/llamacpp_peer.py): base, one LoRA,
               and switch8 (8 adapters served one request after another, as a llama.cpp sidecar would)
  vllm_*       vLLM's CPU build in its own venv (bench/peers/vllm_peer.py): mixed (a LoRARequest per
               prompt) and base
The peers are optional and installed by `make bench-peers`; a peer that is not installed is skipped.

tokens_per_s counts generated tokens over wall time including prefill;
ms_per_step is wall time per decode step of the whole batch (for npcd the
mean time of its decode steps alone, for the others total time / output tokens).
One-at-a-time serving has no batch effect, so peft_serial runs the first
min(batch, serial_cap) requests of each batch and reports their rate.

    make bench-peers                     # once: llama.cpp and vLLM-CPU (the build takes 10-25 min)
    python bench/multilora.py            # full chart (~15-20 min on 2 cores, more with the peers)
    python bench/multilora.py --quick    # ~2 min: fewer tokens and batch sizes
    python bench/multilora.py --out results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from npcd.engine.api import Finished, GenerationRequest, SamplingParams, TextDelta  # noqa: E402
from npcd.engine.config import EngineConfig  # noqa: E402
from npcd.engine.engine import Engine  # noqa: E402
from npcd.engine.platform import cpu_has_native_bf16, place  # noqa: E402
from npcd.engine.testing import write_lora  # noqa: E402
from npcd.engine.weights import resolve_base  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS_DIR))  # the peers' shared module: record format and prompts
from common import Record, make_prompts  # noqa: E402

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 43
    output_tokens: int = 100
    rank: int = 64
    adapters: int = 8
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    serial_cap: int = 8


QUICK = Workload(output_tokens=24, batches=(1, 8, 32), serial_cap=2)


def make_adapters(base_dir: Path, root: Path, w: Workload) -> list[Path]:
    # small weights keep the rank-64 deltas realistic in size; the content is irrelevant to speed
    return [write_lora(base_dir, root / f"a{i}", w.rank, ALL_MODULES, seed=i, std=0.01)
            for i in range(w.adapters)]


def bench_npcd(engine: Engine, prompts, adapters: list[str | None], w: Workload, batch: int) -> Record:
    reqs = [GenerationRequest(f"b{batch}-{i}-{time.monotonic_ns()}", prompts[i],
                              SamplingParams(max_tokens=w.output_tokens, ignore_eos=True),
                              adapter=adapters[i % len(adapters)]) for i in range(batch)]
    decode_time, decode_steps = 0.0, 0
    first_token: dict[str, float] = {}

    def sink(event) -> None:
        if isinstance(event, (TextDelta, Finished)):
            first_token.setdefault(event.request_id, time.perf_counter())

    start = time.perf_counter()
    for r in reqs:
        engine.submit(r, sink)
    while engine.has_work():
        prefill = bool(len(engine.scheduler.waiting)) or not engine.running
        t0 = time.perf_counter()
        engine.step()
        if not prefill:
            decode_time += time.perf_counter() - t0
            decode_steps += 1
    wall = time.perf_counter() - start
    generated = batch * w.output_tokens
    ttft = 1000 * sum(t - start for t in first_token.values()) / len(first_token)
    return Record("", batch, generated / wall, 1000 * decode_time / max(decode_steps, 1), ttft)


def bench_peft(model, tokenizer, prompts, names: list[str], w: Workload, batch: int, mixed: bool) -> Record:
    def generate(ids: list[list[int]], adapter_names: list[str] | None) -> None:
        tokens = torch.tensor(ids)
        kwargs = dict(max_new_tokens=w.output_tokens, min_new_tokens=w.output_tokens, do_sample=False,
                      pad_token_id=tokenizer.eos_token_id, attention_mask=torch.ones_like(tokens))
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        model.generate(tokens, **kwargs)

    with torch.no_grad():
        if mixed:
            start = time.perf_counter()
            generate(prompts[:batch], [names[i % len(names)] for i in range(batch)])
            served = batch
        else:
            served = min(batch, w.serial_cap)
            start = time.perf_counter()
            for i in range(served):
                if names:
                    model.set_adapter(names[i % len(names)])
                generate([prompts[i]], None)
        wall = time.perf_counter() - start
    tokens = served * w.output_tokens
    return Record("", batch, tokens / wall, 1000 * wall / w.output_tokens / (1 if mixed else served))


def run_peer(python: Path, script: str, prompts: list[list[int]], adapters: list[Path], w: Workload,
             base_dir: Path, tmp: Path) -> list[Record]:
    """One peer as a subprocess on the same prompts and adapter files; [] when it is not installed."""
    prompts_file, out_file = tmp / "prompts.json", tmp / f"{script}.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = [str(python), str(PEERS_DIR / script), "--hf-base", str(base_dir), "--adapters", *map(str, adapters),
           "--prompts-json", str(prompts_file), "--output-tokens", str(w.output_tokens),
           "--batches", *map(str, w.batches), "--json-out", str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {script}: failed (exit {proc.returncode}), skipped:\n{proc.stderr[-2000:]}", flush=True)
        return []
    return [Record(**r) for r in json.loads(out_file.read_text())]


def peer_pythons(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The peers that are installed: llama.cpp in this venv, vLLM in its own."""
    peers = []
    if importlib.util.find_spec("llama_cpp") is not None:
        peers.append((Path(sys.executable), "llamacpp_peer.py"))
    if args.vllm_python.is_file():
        peers.append((args.vllm_python, "vllm_peer.py"))
    return peers


def machine_limits(threads: int) -> dict[str, float]:
    """What this CPU can do, measured now: stream bandwidth (a 512 MB fp32 copy) and fp32 GEMM peak."""
    torch.set_num_threads(threads)
    src = torch.ones(128 << 20)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * 4 / best / 1e9              # read + write
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"stream_gb_s": bandwidth, "gemm_gflop_s": 2 * 2048 ** 3 / best / 1e9}


def step_cost(engine: Engine) -> tuple[float, float]:
    """Bytes of weights one decode step reads (projections and LM head as stored), and FLOPs per token."""
    m = engine.model
    s = m.spec
    params = sum(i * o for i, o in s.module_shapes().values()) * s.num_layers + s.vocab_size * s.hidden_size
    return float(m.weight_bytes), 2.0 * params


PEER_SYSTEMS = ("llamacpp_base", "llamacpp_lora", "llamacpp_switch8", "vllm_mixed", "vllm_base",
                "peft_mixed", "peft_serial", "hf_generate")


def print_table(records: list[Record], limits: dict[str, float], costs: dict[str, tuple[float, float]]) -> None:
    by = {(r.system, r.batch): r for r in records}
    npcd_systems = list(dict.fromkeys(r.system for r in records if r.system.startswith("npcd_")))
    systems = npcd_systems + [s for s in PEER_SYSTEMS if any(r.system == s for r in records)]
    batches = sorted({r.batch for r in records})
    print(f"\n{'system':<18}" + "".join(f"{'B=' + str(b):>26}" for b in batches))
    for s in systems:
        cells = []
        for b in batches:
            r = by.get((s, b))
            ttft = f" {r.ttft_ms:6.0f}ms" if r is not None and r.ttft_ms is not None else " " * 9
            cells.append(f"{r.tokens_per_s:7.1f} {r.ms_per_step:6.1f}ms{ttft}" if r else "")
        print(f"{s:<18}" + "".join(f"{c:>26}" for c in cells))
    print("(tokens/s, ms per decode step of the batch, mean time to first token)")
    print(f"\nmachine, measured now: stream {limits['stream_gb_s']:.1f} GB/s, fp32 GEMM {limits['gemm_gflop_s']:.0f} GFLOP/s")
    for s in (s for s in npcd_systems if s in costs):
        weight_bytes, flops = costs[s]
        print(f"\n{s} (tokens/s ratio to each peer at the same batch; > 1 means npcd is faster):")
        for b in batches:
            mine = by.get((s, b))
            if mine is None:
                continue
            peers = [p for p in PEER_SYSTEMS if (p, b) in by]
            parts = [f"{p} x{mine.tokens_per_s / by[p, b].tokens_per_s:.2f}" for p in peers]
            if b == 1:
                gbs = weight_bytes / (mine.ms_per_step / 1000) / 1e9
                parts.append(f"{gbs:.1f} GB/s = {gbs / limits['stream_gb_s']:.0%} of stream "
                             f"(floor {weight_bytes / limits['stream_gb_s'] / 1e6:.1f} ms/step)")
            if b == max(batches):
                gflops = flops * b / (mine.ms_per_step / 1000) / 1e9
                parts.append(f"{gflops:.0f} GFLOP/s = {gflops / limits['gemm_gflop_s']:.0%} of GEMM peak")
            base = s.replace("mixed", "base")
            if base != s and (base, b) in by:
                parts.append(f"LoRA step / no-adapter step x{mine.ms_per_step / by[base, b].ms_per_step:.2f}")
            print(f"  B={b:<3} " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (~2 minutes)")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    parser.add_argument("--engine", type=Path, help="engine YAML (default: engines/default.yaml settings)")
    parser.add_argument("--systems", default="npcd_mixed,npcd_base,peft_mixed,peft_serial,hf_generate,peers")
    parser.add_argument("--vllm-python", type=Path, default=Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python",
                        help="the vLLM venv's interpreter (make bench-peers creates it)")
    parser.add_argument("--batches", help="comma-separated batch sizes (overrides the mode's)")
    parser.add_argument("--npcd-weights", default="auto,fp32",
                        help="npcd runs once per weights mode (auto resolves to this machine's pick); "
                             "its systems get the mode as a suffix, e.g. npcd_mixed_int4")
    args = parser.parse_args(argv)
    w = QUICK if args.quick else Workload()
    if args.batches:
        w = Workload(**{**asdict(w), "batches": tuple(int(b) for b in args.batches.split(","))})
    systems = set(args.systems.split(","))

    config = EngineConfig.from_yaml(args.engine) if args.engine else EngineConfig()
    config = config.replace(max_batch_size=max(w.batches), max_seq_len=256, max_resident_adapters=w.adapters,
                            max_lora_rank=max(config.max_lora_rank, w.rank))
    device = place(config).device
    dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32  # PEFT's
    base_dir = resolve_base(config.base)
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"device={device} cpu={torch.backends.cpu.get_cpu_capability()} threads={threads} prompt={w.prompt_tokens} "
          f"output={w.output_tokens} rank={w.rank} adapters={w.adapters} batches={list(w.batches)}", flush=True)

    limits = machine_limits(threads)
    records: list[Record] = []
    costs: dict[str, tuple[float, float]] = {}

    def add(system: str, rec: Record | None) -> None:
        if rec is None:
            return
        rec.system = system
        records.append(rec)
        print(f"  {system:<16} B={rec.batch:<3} {rec.tokens_per_s:8.1f} tok/s {rec.ms_per_step:7.1f} ms/step",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(base_dir, Path(tmp), w)
        names = [f"a{i}" for i in range(w.adapters)]
        modes = dict.fromkeys(place(config.replace(weights=m)).weights for m in args.npcd_weights.split(","))
        for mode in modes:
            suffix = f"_{mode}"
            engine = Engine(config.replace(weights=mode))
            print(f"npcd weights={mode}: {engine.describe()['kernels']}", flush=True)
            for name, path in zip(names, adapter_dirs):
                engine.load_adapter(name, str(path))
            prompts = make_prompts(engine.tokenizer, max(w.batches), w.prompt_tokens)
            bench_npcd(engine, prompts, [None], Workload(output_tokens=4), 2)  # warm-up
            costs["npcd_mixed" + suffix] = costs["npcd_base" + suffix] = step_cost(engine)
            for b in w.batches:
                if "npcd_mixed" in systems:
                    add("npcd_mixed" + suffix, bench_npcd(engine, prompts, names, w, b))
                if "npcd_base" in systems:
                    add("npcd_base" + suffix, bench_npcd(engine, prompts, [None], w, b))
            del engine

        if systems & {"peft_mixed", "peft_serial", "hf_generate"}:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
            if "hf_generate" in systems:
                add("hf_generate", bench_peft(base, tokenizer, prompts, [], w, 1, mixed=False))
            model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
            for name, path in zip(names[1:], adapter_dirs[1:]):
                model.load_adapter(str(path), adapter_name=name)
            model.eval()
            for b in w.batches:
                if "peft_mixed" in systems:
                    add("peft_mixed", bench_peft(model, tokenizer, prompts, names, w, b, mixed=True))
                if "peft_serial" in systems:
                    add("peft_serial", bench_peft(model, tokenizer, prompts, names, w, b, mixed=False))
            del model, base
        if "peers" in systems:  # after our own runs, so no peer holds memory or threads while npcd runs
            for python, script in peer_pythons(args):
                print(f"running {script} ...", flush=True)
                for rec in run_peer(python, script, prompts, adapter_dirs, w, base_dir, Path(tmp)):
                    add(rec.system, rec)

    print_table(records, limits, costs)
    if args.out:
        args.out.write_text(json.dumps({"machine": limits, "records": [asdict(r) for r in records]}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
