"""The engine on CUDA (bf16): mixed-adapter logits against PEFT on the same GPU, and the quality gate against
fp32 on the CPU. Skipped without a CUDA device; bench/gpu_check.sh runs it on a machine that has one."""

from __future__ import annotations

import pytest
import torch

from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = ["Hello there, traveler.", "Who goes there? Halt!", "Buy my wares, cheap!", "I will destroy you all."]
NAMES = ["elf", "guard", "merchant", None]


def test_auto_resolves_to_bf16_on_cuda(tiny_config):
    engine = Engine(tiny_config.replace(device="auto", weights="auto"))
    described = engine.describe()
    assert described["device"].startswith("cuda") and described["weights"] == "bf16"


def test_mixed_batch_logits_match_peft_on_the_gpu(tiny_config, tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = Engine(tiny_config.replace(device="cuda", weights="bf16"))
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, str(path))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for prompt, name, got in zip(prompts, NAMES, engine.score(prompts, NAMES)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
        if name:
            model = PeftModel.from_pretrained(model, tiny_adapters[name])
        with torch.no_grad():
            want = model(torch.tensor([prompt]).cuda()).logits[0].float()
        torch.testing.assert_close(got.float().cpu(), want.cpu(), atol=5e-2, rtol=5e-2, msg=f"adapter {name}")


def test_bf16_on_cuda_stays_close_to_fp32_on_the_real_model(real_model_dir):
    lines = ["Who are you, and why do you hate the king?", "What do you sell, merchant?",
             "Tell me a story about a lighthouse.", "Halt! Papers, please."]
    exact = Engine(EngineConfig(base=str(real_model_dir), device="cpu", weights="fp32", max_batch_size=4,
                                max_seq_len=128))
    fast = Engine(EngineConfig(base=str(real_model_dir), device="cuda", weights="bf16", max_batch_size=4,
                               max_seq_len=128))
    tok = exact.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for line in lines]
    kl, agree, tokens = 0.0, 0, 0
    for a, b in zip(exact.score(prompts, [None] * 4), fast.score(prompts, [None] * 4)):
        log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b.float().cpu(), -1)
        kl += (log_a.exp() * (log_a - log_b)).sum().item()
        agree += int((a.argmax(-1) == b.cpu().argmax(-1)).sum())
        tokens += a.shape[0]
    assert kl / tokens <= 0.02 and agree / tokens >= 0.95, (kl / tokens, agree / tokens)
