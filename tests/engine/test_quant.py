"""`quantize: lm_head_int8`: how far the int8 LM head moves the bundled model, that a row's output does not
depend on its batch companions, and where it may run."""

from __future__ import annotations

import pytest
import torch

from npcd.engine import engine as engine_module
from npcd.engine.api import GenerationRequest, SamplingParams
from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine, pick_device_dtype
from npcd.engine.quant import Int8Head

pytestmark = pytest.mark.skipif(not engine_module.quant.supported(), reason="torch build without fbgemm")

LINES = ["Who are you, and why do you hate the king?", "What do you sell, merchant?",
         "Tell me a story about a lighthouse.", "Halt! Papers, please."]


def test_int8_head_stays_close_to_fp32_on_the_real_model(real_model_dir):
    config = EngineConfig(base=str(real_model_dir), dtype="float32", quantize="none", max_batch_size=4, max_seq_len=128)
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
    assert kl / tokens <= 0.02, kl / tokens      # the quality gate of every quantized mode
    assert agree / tokens >= 0.95, agree / tokens


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


def test_int8_head_logits_of_a_row_do_not_depend_on_its_companions():
    torch.manual_seed(0)
    weight, norm = torch.randn(4096, 64) * 0.05, torch.rand(64) + 0.5
    h = torch.randn(24, 64) * torch.linspace(0.1, 8, 64)            # outlier channels, as in the real model
    x = torch.nn.functional.rms_norm(h, (64,), norm)
    head = Int8Head(weight, norm)
    batched = head(x)
    for i in range(len(x)):
        assert torch.equal(head(x[i:i + 1])[0], batched[i])
        assert torch.equal(head(x[max(0, i - 3):i + 1])[-1], batched[i])
    exact = x @ weight.T
    assert torch.equal(batched.argmax(-1), exact.argmax(-1))
    top = exact.topk(2, -1).indices  # the likely tokens carry exact fp32 logits
    torch.testing.assert_close(batched.gather(1, top), exact.gather(1, top))


def test_greedy_and_seeded_text_alone_equals_batched_in_the_mode_auto_picks_here(real_model_dir):
    config = EngineConfig(base=str(real_model_dir), dtype="float32", quantize="lm_head_int8", max_batch_size=8,
                          max_seq_len=128)
    engine = Engine(config)
    tok = engine.tokenizer
    lines = LINES + ["The dragon burned the mill last night.", "Can you fix my sword?",
                     "What news from the capital?", "Why are the wolves so bold this winter?"]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for line in lines]
    for temperature, seed in ((0.0, None), (0.8, 7)):
        def requests(tag: str) -> list[GenerationRequest]:
            return [GenerationRequest(f"{tag}{i}", p, SamplingParams(max_tokens=24, temperature=temperature,
                                                                     seed=seed, ignore_eos=True))
                    for i, p in enumerate(prompts)]
        alone = [engine.generate([r])[0].text for r in requests("alone")]
        batched = [f.text for f in engine.generate(requests("batched"))]
        assert alone == batched, temperature
