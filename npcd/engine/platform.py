"""What this machine is, and the weights mode and device the engine picks for it.

`weights: auto` resolves here, once at start, and the reason is logged:

  CUDA                        bf16 (the block kernel is CPU-only)
  CPU with AVX2 + FMA and a   int4: npcd's block kernel, 4-bit weights (the bundled model's own
  C++ compiler                Q4_1, exact) and int8 activations; 5x less time than fp32 for one
                              step's projections at batch 1 on the AVX2 EPYC, 8x on the Zen 4
                              (AVX-512 VNNI path, also faster than its native bf16 at batch 1-32)
  CPU with native bf16 only   bf16
  anything else               fp32
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from npcd.engine.config import EngineConfig


@cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_model_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


@dataclass(frozen=True)
class Placement:
    device: "torch.device"
    weights: str   # a concrete mode of npcd.engine.quant.WEIGHT_MODES
    reason: str    # why, for the startup log


def place(config: "EngineConfig") -> Placement:
    """The device and the concrete weights mode for this config on this machine."""
    import torch

    from npcd.engine.kernels import load_cpu_kernels, why_unavailable

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} was asked for, but CUDA is not available")
    if config.weights != "auto":
        return Placement(device, config.weights, "set in the engine config")
    if device.type == "cuda":
        return Placement(device, "bf16", "CUDA: bf16 tensor cores")
    missing = why_unavailable()
    if missing is None and load_cpu_kernels() is None:  # builds it now if it has to; a failed build says why
        missing = why_unavailable()
    if missing is None:
        return Placement(device, "int4", "CPU with AVX2/FMA: npcd's block kernel on 4-bit weights")
    if cpu_has_native_bf16():
        return Placement(device, "bf16", f"native bf16; block kernel unavailable ({missing})")
    return Placement(device, "fp32", f"no native bf16, block kernel unavailable ({missing})")
