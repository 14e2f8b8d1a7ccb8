"""npcd's own CPU kernels, compiled once per machine kind and cached.

`blockq.cpp` is the block-quantized linear, `decode.cpp` the fused glue of an fp32
step (norms, SiLU, rotary embedding, attention), `lora.cpp` the segmented
mixed-adapter LoRA delta, `layers.cpp` a block-mode forward's loop over the layers
calling them; each file's header says what it computes and why PyTorch's own paths
(or Python) were not enough. They are one extension, built with torch's
C++ extension loader at the first start that needs it (~45 s on 2 cores), with the
ISA flags this CPU has (AVX2/FMA/F16C, plus the AVX-512 VNNI set where all of it is
there: blockq.cpp then runs its VNNI path), into
`<npcd cache>/kernels/<flags>-<sources hash>-torch<version>`;
later starts load the cached library in well under a second. A machine without
AVX2/FMA or a C++ compiler, or where the build fails (no Python headers, say),
gets `None`, `why_unavailable()` says why, and `weights: auto` falls back to
PyTorch's dense kernels and logs the reason.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import ModuleType

from npcd.engine.platform import cpu_flags

SOURCES = tuple(Path(__file__).with_name(name) for name in ("blockq.cpp", "decode.cpp", "lora.cpp", "layers.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "blockq_amx.h", "layer_ops.h"))  # part of the build's identity, not compiled on their own
# The flags that change the generated code; a cache directory is specific to them. Each set is used whole
# or not at all: the VNNI path of blockq.cpp needs every flag of its set, the AMX path (blockq_amx.h) both tile
# flags on top of it.
ISA_SETS = (
    {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"},
    {"avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl", "avx512dq": "-mavx512dq",
     "avx512_vnni": "-mavx512vnni"},
    {"amx_tile": "-mamx-tile", "amx_int8": "-mamx-int8"},
)


def runnable_isa_levels() -> list[tuple[str, ...]]:
    """The flags of every build this CPU runs, narrowest first: [AVX2], [AVX2, + AVX-512 VNNI] or
    [AVX2, + AVX-512 VNNI, + AMX]."""
    have = cpu_flags()
    levels: list[tuple[str, ...]] = []
    for isa in ISA_SETS:
        if not set(isa) <= have:
            break
        levels.append((levels[-1] if levels else ()) + tuple(isa.values()))
    return levels


def machine_isa() -> tuple[str, ...]:
    """The flags of the widest build this CPU runs (the one the engine loads when it builds and runs)."""
    levels = runnable_isa_levels()
    return levels[-1] if levels else ()


@dataclass(frozen=True)
class LoadedKernel:
    module: ModuleType
    flags: tuple[str, ...]
    build_s: float   # 0.0 when the cached build was loaded
    path: Path
    skipped: tuple[str, ...] = ()  # wider builds passed over, with the reason (load_cpu_kernels)


_build_errors: dict[tuple[str, ...], str] = {}  # a failed build's message, by its flags
_unavailable: list[str] = []  # why no build loads, once load_cpu_kernels() has tried them all


def why_unavailable() -> str | None:
    """None when the kernels can be built here (or are built), else the reason they cannot."""
    if _unavailable:
        return _unavailable[0]
    missing = [f for f in ("avx2", "fma") if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) on PATH"
    try:
        import ninja  # noqa: F401  (torch's extension loader drives the build with it)
    except ImportError:
        return "the ninja package is missing (pip install ninja)"
    return None


# torch's extension loader serialises builds with a lock file and waits for it without end; a process killed
# mid-build (a game closing the daemon during its first start) leaves the file behind, and every later start
# would hang. A build takes ~45 s on a 2-core machine, so a lock this old has no builder.
BUILD_LOCK_STALE_S = 600


def _clear_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > BUILD_LOCK_STALE_S:
        lock.unlink(missing_ok=True)


@cache
def load_cpu_kernels() -> LoadedKernel | None:
    """The widest build that compiles and runs here, or None where `why_unavailable()` says why not.

    A build that fails, or that the machine refuses (the OS may withhold the AMX tile state), gives way to the
    next narrower one; `skipped` on the result says what was passed over and why."""
    if why_unavailable() is not None:
        return None
    skipped: list[str] = []
    for flags in reversed(runnable_isa_levels()):
        built = build_cpu_kernels(flags)
        if built is None:
            skipped.append(build_error(flags) or f"the {' '.join(flags)} build failed")
        elif refusal := built.module.refusal():
            skipped.append(f"the {built.module.path()} build cannot run here: {refusal}")
        else:
            return replace(built, skipped=tuple(skipped))
    _unavailable.append("; ".join(skipped))
    return None


def build_error(flags: tuple[str, ...]) -> str | None:
    """Why the build with exactly `flags` failed, once `build_cpu_kernels(flags)` has returned None."""
    return _build_errors.get(flags)


def build_cpu_kernels(flags: tuple[str, ...]) -> LoadedKernel | None:
    """The extension compiled with exactly `flags` (one of `runnable_isa_levels()`: tests build the AVX2
    path on an AVX-512 machine this way); None on failure, the reason kept for `load_cpu_kernels()`."""
    return _build(flags, SOURCES)


@cache
def _build(flags: tuple[str, ...], sources: tuple[Path, ...]) -> LoadedKernel | None:
    import torch
    from torch.utils import cpp_extension

    from npcd.engine.weights import cache_root

    code = b"".join(p.read_bytes() for p in (*sources, *HEADERS))
    # The sources' location is part of the key: torch's loader rebuilds whenever the ninja file's sources
    # change path or time, so two checkouts (or installs) sharing one cache dir would rebuild each other's.
    where = str(sources[0].resolve().parent).encode()
    digest = hashlib.sha256(code + " ".join(flags).encode() + where).hexdigest()[:12]
    tag = "-".join(f.removeprefix("-m") for f in flags)
    build_dir = cache_root() / "kernels" / f"{tag}-{digest}-torch{torch.__version__.replace('+', '_')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir / "lock")
    cached = any(build_dir.glob("*.so"))
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=f"npcd_cpu_{digest}", sources=[str(p) for p in sources],
                                    build_directory=str(build_dir),
                                    extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                                    verbose=False)
    except Exception as exc:  # noqa: BLE001 -- any build failure means: serve with PyTorch's kernels
        message = str(exc).strip().splitlines()
        _build_errors[flags] = f"the kernel build failed in {build_dir}: {message[-1] if message else exc!r}"
        return None
    return LoadedKernel(module=module, flags=flags, build_s=0.0 if cached else time.perf_counter() - start,
                        path=build_dir)
