"""`quantize: lm_head_int8`: how far the int8 LM head moves the bundled model, and where it may run."""

from __future__ import annotations

import pytest
import torch

from npcd import engine as engine_module
from npcd.config import EngineConfig
from npcd.engine import Engine, pick_device_dtype

pytestmark = pytest.mark.skipif(not engine_module.quant.supported(), reason="torch build without fbgemm")

LINES = ["Who are you, and why do you hate the king?", "What do you sell, merchant?",
         "Tell me a story about a lighthouse.", "Halt! Papers, please."]


def test_int8_head_stays_close_to_fp32_on_the_real_model(real_model_dir):
    config = EngineConfig(base=str(real_model_dir), dtype="float32", max_batch_size=4, max_seq_len=128)
    exact, fast = Engine(config), Engine(config.replace(quantize="lm_head_int8"))
    tok = exact.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for line in LINES]
    kl, agree, tokens = 0.0, 0, 0
    for a, b in zip(exact.score(prompts, [None] * 4), fast.score(prompts, [None] * 4)):
        log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl += (log_a.exp() * (log_a - log_b)).sum().item()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        tokens += a.shape[0]
        assert not torch.equal(a, b)  # it really is a different head
    assert kl / tokens < 0.03, kl / tokens
    assert agree / tokens > 0.93, agree / tokens


def test_where_the_int8_head_may_run(monkeypatch):
    with pytest.raises(ValueError, match="quantize: lm_head_int8 runs on the CPU only"):
        EngineConfig(quantize="lm_head_int8", device="cuda").validate()
    with pytest.raises(ValueError, match="dtype must be auto or float32"):
        EngineConfig(quantize="lm_head_int8", dtype="bfloat16").validate()
    with pytest.raises(ValueError, match="quantize must be one of"):
        EngineConfig(quantize="int4").validate()
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: False)
    assert pick_device_dtype(EngineConfig(device="cpu", quantize="auto")) == (torch.device("cpu"), torch.float32,
                                                                             "lm_head_int8")
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)  # AMX: bf16 instead, no int8 head
    assert pick_device_dtype(EngineConfig(device="cpu", quantize="auto")) == (torch.device("cpu"), torch.bfloat16,
                                                                             "none")
