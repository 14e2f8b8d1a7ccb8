"""What bench/multilora.py and its peers share: the record format, the prompts, a base dir the peers can load.

The peers run in other environments (llama.cpp's wheel, vLLM's own venv), so
this module imports neither npcd nor torch: each script puts this folder on its
path and imports it by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Record:
    system: str
    batch: int
    tokens_per_s: float       # generated tokens / wall time of the whole batch, prefill included
    ms_per_step: float        # wall time of one decode step of the whole batch
    ttft_ms: float | None = None   # mean over the batch's requests of start -> first token
    threads: int | None = None     # the peer's CPU threads, where it chose them


def make_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """Distinct chat-like prompts of exactly `length` token ids (NVIDIA's workload: 43)."""
    prompts = []
    for i in range(count):
        text = (f"NPC {i} hears the player ask about the road north, the price of bread, the old war, "
                f"the weather over the hills and the rumours from the capital. ") * 4
        ids = tokenizer.encode(text)[:length]
        if len(ids) != length:
            raise SystemExit(f"prompt template gives {len(ids)} tokens, need {length}")
        prompts.append(ids)
    return prompts


def base_with_architectures(hf_base: Path, tmp: Path) -> Path:
    """A symlinked copy of the base dir whose config.json names the architecture.

    llama.cpp's LoRA converter and vLLM pick their model class from
    config["architectures"], which our cached config (written by transformers
    from a GGUF) leaves null. The cache dir itself is never modified.
    """
    out = tmp / "base"
    out.mkdir()
    for f in hf_base.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((hf_base / "config.json").read_text())
    if not cfg.get("architectures"):
        cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_records(records: list[Record], json_out: Path | None) -> None:
    """The records as JSON on stdout (progress goes to stderr), and in `json_out` when given."""
    out = json.dumps([asdict(r) for r in records], indent=1)
    if json_out:
        json_out.write_text(out + "\n")
    print(out)
