"""Adapters as users bring them: PEFT's per-module rank and alpha patterns, its defaults, and adapters that
do not fit this base. Each served adapter is pinned against PEFT's own logits; each misfit is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from npcd.engine.adapters import module_name
from npcd.engine.api import AdapterError
from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine
from npcd.engine.testing import write_lora, write_tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 504, 2536, 314, 260, 3604, 30, 549, 1340]


@pytest.fixture(scope="module")
def base8(tmp_path_factory, real_model_dir):
    """A tiny Llama with 8 layers, so patterns can name layer 7."""
    return write_tiny_llama(tmp_path_factory.mktemp("base8") / "model", real_model_dir, seed=3, num_hidden_layers=8)


def engine_for(base) -> Engine:
    return Engine(EngineConfig(base=str(base), weights="fp32", device="cpu", max_batch_size=2, max_seq_len=64,
                               max_resident_adapters=2, threads=2))


def peft_logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def assert_matches_peft(base, adapter) -> None:
    engine = engine_for(base)
    engine.load_adapter("a", str(adapter))
    torch.testing.assert_close(engine.score([PROMPT], ["a"])[0], peft_logits(base, adapter), atol=2e-5, rtol=1e-4)


def test_module_names_are_the_transformers_names():
    assert module_name(2, "up_proj") == "model.layers.2.mlp.up_proj"
    assert module_name(0, "o_proj") == "model.layers.0.self_attn.o_proj"


def test_rank_and_alpha_patterns_follow_peft(base8, tmp_path):
    """Keys that name a path (with self_attn. / mlp.), anchored keys, and two keys matching one module
    (PEFT takes the first)."""
    adapter = write_lora(base8, tmp_path / "patterns", 4, ALL, seed=1, alpha=8, std=0.2,
                         rank_pattern={"layers.7.mlp.down_proj": 2, "self_attn.o_proj": 6},
                         alpha_pattern={"self_attn.o_proj": 3, "^model.layers.2.mlp.up_proj": 40,
                                        "layers.7.mlp.down_proj": 7, "layers.3.self_attn.v_proj": 13,
                                        "v_proj": 17})
    assert_matches_peft(base8, adapter)


def test_a_config_without_lora_alpha_takes_peft_default(base8, tmp_path):
    adapter = write_lora(base8, tmp_path / "no-alpha", 4, ["q_proj", "down_proj"], seed=2, alpha=4, std=0.2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_matches_peft(base8, adapter)  # PEFT's default is 8: scale 2.0, not 1.0
    info = engine_for(base8).load_adapter("a", str(adapter))
    assert info.alpha == 8 and info.scaling == 2.0


def test_layers_to_transform_is_served_and_checked(base8, tmp_path):
    adapter = write_lora(base8, tmp_path / "top", 4, ["q_proj", "v_proj"], seed=3, std=0.2,
                         layers_to_transform=[5, 6, 7])
    assert_matches_peft(base8, adapter)


def test_an_aLoRA_adapter_is_refused(base8, tmp_path):
    adapter = write_lora(base8, tmp_path / "alora", 4, ["q_proj"], seed=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": [504, 2536]}))
    with pytest.raises(AdapterError, match=r"aLoRA adapters \(alora_invocation_tokens\) are not supported"):
        engine_for(base8).load_adapter("a", str(adapter))


def test_an_adapter_of_a_smaller_base_of_the_same_width_is_refused(base8, tiny_model_dir, tmp_path):
    adapter = write_lora(tiny_model_dir, tmp_path / "two-layers", 4, ["q_proj", "v_proj"], seed=5)
    with pytest.raises(AdapterError, match=r"q_proj has LoRA weights for layers 0-1, but adapter_config.json says "
                                           r"layers 0-7 \(the config names no layers_to_transform, so all 8; was "
                                           r"it trained on another base model\? its base_model_name_or_path is"):
        engine_for(base8).load_adapter("a", str(adapter))


def test_another_base_name_loads_with_a_warning(base8, tmp_path):
    adapter = write_lora(base8, tmp_path / "renamed", 4, ["q_proj"], seed=6)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/llama-7b"}))
    info = engine_for(base8).load_adapter("a", str(adapter))
    assert info.warning == f"trained on base 'meta/llama-7b', served on {sorted({str(base8), base8.name})[0]!r}"
    copy = shutil.copytree(base8, tmp_path / "elsewhere" / base8.name)  # the same base on another path is fine
    config["base_model_name_or_path"] = str(copy)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert engine_for(base8).load_adapter("a", str(adapter)).warning == ""
