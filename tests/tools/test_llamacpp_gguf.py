"""The llama.cpp sidecar's GGUF files: when they are converted, and the LoRA scale that matches PEFT."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from npcd.tools.loadtest import llamacpp_gguf


def adapter_with(tmp_path, **config):
    directory = tmp_path / "adapter"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, **config}))
    return directory


def test_lora_scale_undoes_the_rank_division_for_rslora(tmp_path):
    assert llamacpp_gguf.lora_scale(adapter_with(tmp_path / "a")) == 1.0
    assert llamacpp_gguf.lora_scale(adapter_with(tmp_path / "b", use_rslora=True)) == math.sqrt(16)


@pytest.mark.parametrize("config,problem", [
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"use_rslora": True, "rank_pattern": {"q_proj": 4}}, "rank_pattern"),
])
def test_adapters_llamacpp_would_get_wrong_are_refused(tmp_path, config, problem):
    with pytest.raises(ValueError, match=problem):
        llamacpp_gguf.lora_scale(adapter_with(tmp_path, **config))


def test_a_missing_converter_names_what_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NPCD_CACHE", str(tmp_path))
    problem = llamacpp_gguf.missing()
    assert problem is not None and "make bench-peers" in problem


@pytest.mark.slow  # runs llama.cpp's converter
@pytest.mark.skipif(llamacpp_gguf.missing() is not None, reason=f"llama.cpp: {llamacpp_gguf.missing()}")
def test_an_adapter_is_converted_once_per_content(tmp_path, tiny_model_dir, tiny_adapters):
    first = llamacpp_gguf.lora_gguf(tiny_adapters["guard"], tiny_model_dir)
    written = first.stat().st_mtime_ns
    copy = shutil.copytree(tiny_adapters["guard"], tmp_path / "copy")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere"}))
    assert llamacpp_gguf.lora_gguf(copy, tiny_model_dir) == first  # where it was trained does not matter
    assert first.stat().st_mtime_ns == written
    (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    assert llamacpp_gguf.lora_gguf(copy, tiny_model_dir) != first  # what it computes does
