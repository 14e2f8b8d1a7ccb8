"""Multi-LoRA serving benchmark: npcd against transformers + PEFT, same machine, same run.

The workload follows NVIDIA's multi-LoRA chart for RTX PCs: 43 prompt tokens,
100 output tokens, LoRA rank 64 on every linear module, each request of a
batch on a different adapter (8 adapters, cycling), batch sizes 1..32.

Systems (all measured in this run, same dtype and thread count):
  peft_serial  transformers + PEFT, one request at a time, set_adapter() per request
  peft_mixed   PEFT's mixed-adapter batch: one generate() with adapter_names=
  hf_generate  transformers.generate, batch 1, no adapter (the single-stream reference)
  npcd_base    our engine, no adapters
  npcd_mixed   our engine, one adapter per row, 8 adapters cycling
  npcd_*_int8  the same with `quantize: lm_head_int8` (int8 LM head; everything else fp32)
  llamacpp     llama.cpp on the original GGUF, single stream (only if llama_cpp imports)

tokens_per_s counts generated tokens over wall time including prefill;
ms_per_step is wall time per decode step of the whole batch (for npcd the
mean time of its decode steps alone, for the others total time / output tokens).
One-at-a-time serving has no batch effect, so peft_serial runs the first
min(batch, serial_cap) requests of each batch and reports their rate.

    python bench/multilora.py            # full chart (~15-20 min on 2 cores)
    python bench/multilora.py --quick    # ~2 min: fewer tokens and batch sizes
    python bench/multilora.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from npcd.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from npcd.engine.config import EngineConfig  # noqa: E402
from npcd.engine.engine import Engine, pick_device_dtype  # noqa: E402
from npcd.engine.testing import write_lora  # noqa: E402
from npcd.engine.weights import embedded_gguf_path, resolve_base  # noqa: E402

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Record:
    system: str
    batch: int
    tokens_per_s: float
    ms_per_step: float


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 43
    output_tokens: int = 100
    rank: int = 64
    adapters: int = 8
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    serial_cap: int = 8


QUICK = Workload(output_tokens=24, batches=(1, 8, 32), serial_cap=2)


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Distinct chat prompts of exactly `length` tokens."""
    prompts = []
    for i in range(count):
        text = (f"NPC {i} hears the player ask about the road north, the price of bread, the old war, "
                f"the weather over the hills and the rumours from the capital. ") * 4
        prompts.append(tokenizer.encode(text)[:length])
    return prompts


def make_adapters(base_dir: Path, root: Path, w: Workload) -> list[Path]:
    # small weights keep the rank-64 deltas realistic in size; the content is irrelevant to speed
    return [write_lora(base_dir, root / f"a{i}", w.rank, ALL_MODULES, seed=i, std=0.01)
            for i in range(w.adapters)]


def bench_npcd(engine: Engine, prompts, adapters: list[str | None], w: Workload, batch: int) -> Record:
    reqs = [GenerationRequest(f"b{batch}-{i}-{time.monotonic_ns()}", prompts[i],
                              SamplingParams(max_tokens=w.output_tokens, ignore_eos=True),
                              adapter=adapters[i % len(adapters)]) for i in range(batch)]
    decode_time, decode_steps = 0.0, 0
    sinks_done: list = []
    for r in reqs:
        engine.submit(r, sinks_done.append)
    start = time.perf_counter()
    while engine.has_work():
        prefill = bool(len(engine.scheduler.waiting)) or not engine.running
        t0 = time.perf_counter()
        engine.step()
        if not prefill:
            decode_time += time.perf_counter() - t0
            decode_steps += 1
    wall = time.perf_counter() - start
    generated = batch * w.output_tokens
    return Record("", batch, generated / wall, 1000 * decode_time / max(decode_steps, 1))


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


def bench_llamacpp(prompts, w: Workload) -> Record | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    start = time.perf_counter()
    out = llm.create_completion(prompt=prompts[0], max_tokens=w.output_tokens, temperature=0.0)
    wall = time.perf_counter() - start
    n = out["usage"]["completion_tokens"]
    return Record("llamacpp", 1, n / wall, 1000 * wall / max(n, 1))


def print_table(records: list[Record]) -> None:
    by = {(r.system, r.batch): r for r in records}
    order = ("npcd_mixed", "npcd_base", "npcd_mixed_int8", "npcd_base_int8",
             "peft_mixed", "peft_serial", "hf_generate", "llamacpp")
    systems = [s for s in order if any(r.system == s for r in records)]
    batches = sorted({r.batch for r in records})
    print(f"\n{'system':<16}" + "".join(f"{'B=' + str(b):>18}" for b in batches))
    for s in systems:
        cells = [f"{by[s, b].tokens_per_s:8.1f} {by[s, b].ms_per_step:6.1f}ms" if (s, b) in by else " " * 18
                 for b in batches]
        print(f"{s:<16}" + "".join(f"{c:>18}" for c in cells))
    print("(tokens/s, ms per decode step)")
    for suffix in ("", "_int8"):
        mixed_name, base_name = "npcd_mixed" + suffix, "npcd_base" + suffix
        if not any(r.system == mixed_name for r in records):
            continue
        print(f"\nratios (tokens/s of {mixed_name} over ...):")
        for b in batches:
            mixed = by.get((mixed_name, b))
            if not mixed:
                continue
            parts = [f"{other} x{mixed.tokens_per_s / by[other, b].tokens_per_s:.2f}"
                     for other in ("npcd_mixed", "peft_mixed", "peft_serial")
                     if (other, b) in by and other != mixed_name]
            if (base_name, b) in by:
                parts.append(f"step vs {base_name} x{mixed.ms_per_step / by[base_name, b].ms_per_step:.2f}")
            print(f"  B={b:<3} " + ", ".join(parts))
        if (base_name, 1) in by and ("hf_generate", 1) in by:
            ratio = by[base_name, 1].tokens_per_s / by["hf_generate", 1].tokens_per_s
            print(f"  single stream, no adapter: {base_name} / transformers.generate x{ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (~2 minutes)")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    parser.add_argument("--engine", type=Path, help="engine YAML (default: engines/default.yaml settings)")
    parser.add_argument("--systems", default="npcd_mixed,npcd_base,peft_mixed,peft_serial,hf_generate,llamacpp")
    parser.add_argument("--batches", help="comma-separated batch sizes (overrides the mode's)")
    parser.add_argument("--npcd-quantize", default="none,lm_head_int8",
                        help="npcd runs once per quantize mode; lm_head_int8 systems get an _int8 suffix")
    args = parser.parse_args(argv)
    w = QUICK if args.quick else Workload()
    if args.batches:
        w = Workload(**{**asdict(w), "batches": tuple(int(b) for b in args.batches.split(","))})
    systems = set(args.systems.split(","))

    config = EngineConfig.from_yaml(args.engine) if args.engine else EngineConfig()
    config = config.replace(max_batch_size=max(w.batches), max_seq_len=256, max_resident_adapters=w.adapters,
                            max_lora_rank=max(config.max_lora_rank, w.rank))
    device, dtype, _ = pick_device_dtype(config.replace(quantize="none"))
    base_dir = resolve_base(config.base)
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"device={device} dtype={str(dtype).removeprefix('torch.')} threads={threads} prompt={w.prompt_tokens} "
          f"output={w.output_tokens} rank={w.rank} adapters={w.adapters} batches={list(w.batches)}", flush=True)

    records: list[Record] = []

    def add(system: str, rec: Record | None) -> None:
        if rec is None:
            return
        rec.system = system
        records.append(rec)
        print(f"  {system:<12} B={rec.batch:<3} {rec.tokens_per_s:8.1f} tok/s {rec.ms_per_step:7.1f} ms/step",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(base_dir, Path(tmp), w)
        names = [f"a{i}" for i in range(w.adapters)]
        for mode in args.npcd_quantize.split(","):
            suffix = "" if mode == "none" else "_int8"
            engine = Engine(config.replace(quantize=mode))
            for name, path in zip(names, adapter_dirs):
                engine.load_adapter(name, str(path))
            prompts = make_prompts(engine.tokenizer, max(w.batches), w.prompt_tokens)
            bench_npcd(engine, prompts, [None], Workload(output_tokens=4), 2)  # warm-up
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
    if "llamacpp" in systems:
        add("llamacpp", bench_llamacpp(prompts, w))

    print_table(records)
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in records], indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
