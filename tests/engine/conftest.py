"""Fixtures shared by the engine's kernel tests."""

from __future__ import annotations

import pytest

from npcd.engine.kernels import LoadedKernel, build_cpu_kernels, build_error, runnable_isa_levels, why_unavailable

# Every build this machine runs: on an AVX-512 VNNI machine also the AVX2 one, so the AVX2 arithmetic is
# checked on every CI machine, not only on the AVX2-only ones.
LEVELS = runnable_isa_levels() if why_unavailable() is None else []


@pytest.fixture(scope="session", params=LEVELS[::-1] or [None], ids=lambda f: "-".join(f[-1:]) if f else "none")
def build(request) -> LoadedKernel:
    if request.param is None:
        pytest.skip(f"CPU kernels: {why_unavailable()}")
    built = build_cpu_kernels(request.param)
    assert built is not None, build_error(request.param)
    if refusal := built.module.refusal():
        pytest.skip(f"the {built.module.path()} build cannot run here: {refusal}")
    return built
