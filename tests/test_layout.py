"""The package's boundaries: which layers may load torch, and one source for the engine's defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from npcd.engine.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]


def _imports_torch(statement: str) -> bool:
    code = f"import sys; {statement}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip() == "True"


def test_service_personas_and_clients_start_without_torch():
    # the daemon's service layer, the persona tools, the load-test client and `npcd personas check`
    assert not _imports_torch("import npcd.service, npcd.personas, npcd.service.daemon, npcd.service.servicer, "
                              "npcd.personas.loader, npcd.personas.prompt, npcd.engine.api, npcd.engine.config, "
                              "npcd.cli.personas, npcd.cli.loadtest, npcd.tools.loadtest.traffic, npcd")
    # ... and the check really runs torch-free, not just imports
    code = ("import sys; from npcd.cli import main; rc = main(['personas', 'check', 'personas']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120, check=True)


def test_the_engine_does_load_torch():
    assert _imports_torch("import npcd.engine.engine")  # the check above can fail


def test_engine_config_defaults_are_the_shipped_engine_file():
    assert EngineConfig() == EngineConfig.from_yaml(REPO / "engines" / "default.yaml")


def test_no_bench_script_shadows_an_installed_module():
    """`python bench/x.py` puts bench/ first on sys.path, so a script named like an installed module hides it
    from every import in the run: bench/kernels.py once hid the `kernels` package that transformers imports,
    and the peers benchmark failed at its first PEFT import."""
    import importlib.util

    clashes = [p.name for p in (REPO / "bench").rglob("*.py") if importlib.util.find_spec(p.stem) is not None]
    assert not clashes, clashes
