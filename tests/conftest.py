"""Shared fixtures: a tiny random Llama with the real tokenizer, and PEFT adapters over it."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npcd.engine.config import EngineConfig  # noqa: E402
from npcd.engine.testing import write_lora, write_tiny_llama  # noqa: E402
from npcd.engine.weights import resolve_base  # noqa: E402

# name -> (rank, target modules, rsLoRA): different ranks and target sets on purpose
ADAPTER_SPECS = {
    "elf": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "guard": (4, ["q_proj", "v_proj"], False),
    "merchant": (16, ["gate_proj", "up_proj", "down_proj"], True),
    "villain": (2, ["o_proj", "k_proj", "down_proj"], False),
}


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return resolve_base("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", real_model_dir)


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_lora(tiny_model_dir, root / name, rank, targets, seed=i, rslora=rs)
            for i, (name, (rank, targets, rs)) in enumerate(ADAPTER_SPECS.items())}


@pytest.fixture
def tiny_config(tiny_model_dir) -> EngineConfig:
    return EngineConfig(base=str(tiny_model_dir), weights="fp32", device="cpu", max_batch_size=8,
                        max_seq_len=256, max_resident_adapters=4, max_lora_rank=64, max_queue=64, threads=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow`: a test that takes the real model as an argument (modules that start subprocesses mark
    themselves), so `pytest -m "not slow"` is the quick loop on the tiny random model."""
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and "real_model_dir" in inspect.signature(function).parameters:
            item.add_marker(pytest.mark.slow)
