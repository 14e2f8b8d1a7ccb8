"""Executes a step plan: builds the step's tensors, copies cached prefixes, runs the model.

The runner owns the model, the KV cache tensors and the LoRA stacks as the
forward pass sees them; it makes no decision (the scheduler did) and reads no
logits (the postprocessor does).
"""

from __future__ import annotations

import torch

from npcd.engine.kv_cache import KVCache, PrefixCache
from npcd.engine.lora import GatherCache, LoraBatch, LoraStacks, SegmentedLoraBatch
from npcd.engine.model import LlamaModel, RowBlock, StepInputs
from npcd.engine.scheduler import StepPlan


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, stacks: LoraStacks, prefix_cache: PrefixCache,
                 device: torch.device):
        self.model, self.kv, self.stacks, self.device = model, kv, stacks, device
        self._prefix_cache = prefix_cache
        self._gathered = GatherCache()
        self._lora_cache: tuple[tuple, LoraBatch | SegmentedLoraBatch] | None = None
        # the segmented kernel where the model's ops have it (fp32 activations on the CPU; fp32, bf16 or int8 stacks)
        self._lora_add = model.ops.lora_add
        self.prompt_tokens = 0  # prefilled since start (prefix-cache hits excluded)

    @torch.no_grad()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [rows, vocab] of each row's last token (of its chunk, for prefill rows), in `plan.rows` order."""
        blocks: list[RowBlock] = []
        tokens: list[int] = []
        row_slots: list[int] = []
        last_index: list[int] = []
        if plan.decode:
            pos = [s.length - 1 for s in plan.decode]
            blocks.append(RowBlock(slot_start=0, positions=torch.tensor(pos, device=self.device).view(-1, 1),
                                   kv_len=max(pos) + 1))
            tokens += [s.generated[-1] for s in plan.decode]
            row_slots += [s.lora_slot for s in plan.decode]
            last_index += range(len(plan.decode))
        for slot, kv in plan.prefix_hits:
            self.kv.write(slot, kv)
        if plan.prefill:
            news = [seq.prompt[start:end] for seq, (start, end) in zip(plan.prefill, plan.chunks)]
            blocks.append(RowBlock.for_prompts(news, [start for start, _ in plan.chunks], plan.start_slot,
                                                self.device))
            for seq, new in zip(plan.prefill, news):
                tokens += new
                row_slots += [seq.lora_slot] * len(new)
                last_index.append(len(tokens) - 1)
            self.prompt_tokens += sum(len(t) for t in news)
        step = StepInputs(tokens=torch.tensor(tokens, device=self.device), blocks=blocks,
                          last_index=torch.tensor(last_index, device=self.device), lora=self.lora_for(row_slots))
        logits = self.model.forward(step, self.kv.k, self.kv.v)
        for slot, key in plan.prefix_misses:  # a system key's second part is its tokens
            self._prefix_cache.put(key, key[1], self.kv.read(slot, len(key[1])))
        for seq in plan.decode:
            seq.kv_len = seq.length
        for seq, (_, end) in zip(plan.prefill, plan.chunks):
            seq.kv_len = end
        return logits

    @torch.no_grad()
    def score(self, prompts: list[list[int]], lora_slots: list[int]) -> list[torch.Tensor]:
        """Logits at every position of each prompt, in one batch from KV slot 0 (the caller keeps it idle)."""
        row_slots = [slot for slot, p in zip(lora_slots, prompts) for _ in p]
        lengths = torch.tensor([len(p) for p in prompts])
        step = StepInputs(tokens=torch.tensor([t for p in prompts for t in p], device=self.device),
                          blocks=[RowBlock.for_prompts(prompts, [0] * len(prompts), 0, self.device)],
                          last_index=(lengths.cumsum(0) - 1).to(self.device), lora=self.lora_for(row_slots),
                          all_logits=True)
        logits = self.model.forward(step, self.kv.k, self.kv.v)
        return list(logits.split(lengths.tolist()))

    def lora_for(self, row_slots: list[int]) -> LoraBatch | SegmentedLoraBatch | None:
        """The LoRA batch for these per-token adapter slots (-1 = base); reused while the rows are unchanged."""
        if all(s < 0 for s in row_slots):
            return None
        key = (tuple(row_slots), self.stacks.generation)
        if self._lora_cache is None or self._lora_cache[0] != key:
            batch = SegmentedLoraBatch(row_slots, self.stacks, self._lora_add) if self._lora_add is not None \
                else LoraBatch(row_slots, self.stacks, self._gathered)
            self._lora_cache = (key, batch)
        return self._lora_cache[1]
