"""Small real artefacts for tests and examples: a tiny random Llama and PEFT adapters.

They are written with transformers and PEFT themselves, so every test that
uses them exercises the same loading code as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

TINY_CONFIG = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def write_tiny_llama(out_dir: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised Llama with a real tokenizer (copied from `tokenizer_dir`)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(TINY_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # larger-than-default weights give peaked, batch-order-robust logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_lora(base_dir: Path, out_dir: Path, rank: int, targets: Sequence[str], seed: int,
               alpha: float | None = None, rslora: bool = False, std: float = 0.05, **config: Any) -> Path:
    """A PEFT LoRA adapter over `base_dir` with random (non-zero) A and B; `config` goes to LoraConfig
    (rank_pattern, alpha_pattern, layers_to_transform, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                        use_rslora=rslora, lora_dropout=0.0, task_type="CAUSAL_LM", **config)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(out_dir)
    return out_dir
