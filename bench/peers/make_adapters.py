"""Write N random rank-r PEFT LoRA adapters over an HF Llama base directory.

The peers need real adapter files on disk (llama.cpp converts them to GGUF,
vLLM loads them by path).  Weights are random (randn * 0.01, fixed seed per
adapter) because only the cost of applying them matters here, not what they
say; lora_B is filled too, so the LoRA delta is non-zero and cannot be skipped.

    python bench/peers/make_adapters.py --hf-base ~/.cache/npcd/models/smollm2-135m-instruct \
        --out /tmp/npcd-peer-adapters --count 8 --rank 64

Runs in the project venv (torch, transformers, peft); does not import npcd.
Existing adapter dirs are kept, so reruns are cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(hf_base: Path, out: Path, count: int, rank: int, seed: int = 0) -> list[Path]:
    """Create `count` adapters under `out/a{i}`, skipping those already written."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = [out / f"a{i}" for i in range(count)]
    missing = [d for d in dirs if not (d / "adapter_model.safetensors").is_file()]
    if not missing:
        return dirs
    base = AutoModelForCausalLM.from_pretrained(str(hf_base), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                     task_type="CAUSAL_LM", base_model_name_or_path=str(hf_base))
    model = get_peft_model(base, cfg)
    for i, d in enumerate(dirs):
        if d not in missing:
            continue
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.save_pretrained(str(d))
    return dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for d in make_adapters(a.hf_base.expanduser(), a.out.expanduser(), a.count, a.rank, a.seed):
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
