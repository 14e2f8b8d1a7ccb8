"""The llama.cpp sidecar: how a game that embeds llama.cpp would serve its NPCs, as a load-test baseline.

llama.cpp has no mixed-adapter batch. A sidecar built on it keeps one model
and one context, loads every persona's LoRA once, and serves requests one
after another: for each, it points the context at that persona's adapter
(`llama_set_adapters_lora`; no reload), clears the KV cache, prefills the
prompt and decodes token by token. The base is the bundled Q4_1 GGUF (the
file npcd itself dequantizes to fp32), read through llama.cpp's 4-bit
kernels, with the daemon's thread count.

Only the forward pass is llama.cpp's. Token ids go in and come out as they
would in npcd: prompts from the base's HF tokenizer (`PromptBuilder`; the
GGUF's vocabulary is the same), sampling by npcd's own sampler on
llama.cpp's logits (so the repetition penalty, top-k/top-p and seeds mean
the same), and the API, validation, end of turn and detokenizer of
`npcd.tools.loadtest.sidecar`.

    python -m npcd.cli.llamacpp_sidecar --listen 127.0.0.1:0 --personas personas
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path

from npcd.engine.api import SamplingParams
from npcd.personas.loader import Persona
from npcd.tools.loadtest import llamacpp_gguf
from npcd.tools.loadtest.sidecar import OneAtATimeGenerator, TokenStream


class LlamaCppGenerator(OneAtATimeGenerator):
    """One llama.cpp model and context, every persona's adapter loaded once and set per request."""

    name = "llama.cpp sidecar"

    def __init__(self, base: str, base_dir: Path, personas: dict[str, Persona], threads: int, max_seq_len: int):
        problem = llamacpp_gguf.missing()
        if problem:
            raise ImportError(f"the llama.cpp sidecar cannot start: {problem}")
        import llama_cpp
        import torch

        super().__init__(base_dir, personas, max_seq_len)
        torch.set_num_threads(1)  # torch only samples here; idle torch threads would spin against llama.cpp's
        self.lc = llama_cpp
        threads = threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(llamacpp_gguf.base_gguf(base, base_dir)), n_ctx=max_seq_len,
                                   n_batch=max_seq_len, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        hf_vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]
        if self.n_vocab != hf_vocab:  # token ids go straight in: the two must be the same model
            raise ValueError(f"the GGUF base has {self.n_vocab} tokens but {base_dir} has {hf_vocab}")
        self.adapters: dict[str, tuple[object, float]] = {}  # persona id -> (llama.cpp adapter, scale)
        for p in sorted(personas.values(), key=lambda p: p.id):
            if p.adapter_path is None:
                continue
            path = llamacpp_gguf.lora_gguf(p.adapter_path, base_dir)
            adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load {path}, converted from {p.adapter_path}")
            self.adapters[p.id] = (adapter, llamacpp_gguf.lora_scale(p.adapter_path))

    def _use_adapter(self, persona: Persona) -> None:
        """Points the context at the persona's adapter, or at none; the model is never reloaded."""
        lc = self.lc
        if persona.id in self.adapters:
            adapter, scale = self.adapters[persona.id]
            rc = lc.llama_set_adapters_lora(self.llm.ctx, (lc.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                            (ctypes.c_float * 1)(scale))
        else:
            rc = lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for persona {persona.id!r}")

    def _decode(self, persona: Persona, prompt_ids: list[int], params: SamplingParams, stream: TokenStream,
                cancelled: threading.Event) -> None:
        import numpy as np
        import torch

        from npcd.engine.sampler import SamplerState, sample

        self._use_adapter(persona)  # inside the request: switching is part of serving it
        self.llm.reset()            # position 0: the next eval drops the whole KV cache
        self.llm.eval(prompt_ids)
        state = SamplerState(params, seen=set(prompt_ids))
        while not cancelled.is_set():
            logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(1, self.n_vocab))
            [token] = sample(torch.from_numpy(logits), [state])
            state.seen.add(token)
            if stream.push(token):
                return
            self.llm.eval([token])
