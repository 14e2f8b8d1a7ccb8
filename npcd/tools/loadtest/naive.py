"""The naive sidecar: what a game would run without npcd, as the load test's baseline.

One request at a time: transformers `generate` on the base model wrapped by
PEFT, the persona's adapter switched in with `set_adapter` before each
request (personas without an adapter run with adapters disabled), in the
same dtype (fp32) and thread count as the daemon. Everything else (API,
prompts, validation, sampling defaults, end of turn, detokenizer) is the
daemon's, through `npcd.tools.loadtest.sidecar`.

Run it on its own (the load test starts it as a subprocess):

    python -m npcd.cli.naive_sidecar --listen 127.0.0.1:0 --personas personas
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from npcd.engine.api import SamplingParams
from npcd.personas.loader import Persona
from npcd.tools.loadtest.sidecar import OneAtATimeGenerator, TokenStream


class NaiveGenerator(OneAtATimeGenerator):
    """transformers + PEFT, one request at a time on one worker thread."""

    name = "naive sidecar"

    def __init__(self, base_dir: Path, personas: dict[str, Persona], threads: int, max_seq_len: int):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(base_dir, personas, max_seq_len)
        self.torch = torch
        torch.set_num_threads(threads or os.cpu_count() or 1)
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        with_adapter = sorted((p for p in personas.values() if p.adapter_path is not None), key=lambda p: p.id)
        if with_adapter:
            from peft import PeftModel

            first, *rest = with_adapter
            model = PeftModel.from_pretrained(model, str(first.adapter_path), adapter_name=first.id)
            for p in rest:
                model.load_adapter(str(p.adapter_path), adapter_name=p.id)
            model.eval()
        self.model = model
        self.is_peft = bool(with_adapter)

    def _decode(self, persona: Persona, prompt_ids: list[int], params: SamplingParams, stream: TokenStream,
                cancelled: threading.Event) -> None:
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        prompt_pending = True  # generate() hands the prompt to the streamer first

        class Streamer(BaseStreamer):
            def put(self, value: Any) -> None:
                nonlocal prompt_pending
                if prompt_pending:
                    prompt_pending = False
                    return
                for tok in value.reshape(-1).tolist():
                    if stream.push(tok):
                        return

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stream.done or cancelled.is_set(), dtype=torch.bool)

        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                        "top_k": params.top_k or None}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        config = GenerationConfig(max_new_tokens=params.max_tokens, repetition_penalty=params.repetition_penalty,
                                  eos_token_id=None if params.ignore_eos else sorted(self.eos_ids),
                                  pad_token_id=self.tokenizer.eos_token_id, **sampling)
        adapters = contextlib.nullcontext()
        if persona.adapter_path is not None:
            self.model.set_adapter(persona.id)
        elif self.is_peft:
            adapters = self.model.disable_adapter()
        with torch.inference_mode(), adapters:
            self.model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                dtype=torch.long), generation_config=config, streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([Stop()]))
