"""Per-request sampling over a batch of logits.

Each request owns a torch.Generator seeded from its seed and draws exactly
one number per generated token, so its draws never depend on its batch
companions. Its text is then the same alone and batched exactly when its
logits are: in the modes whose operators compute each row on its own (fp32,
int8, int4; `describe()["batch_invariant"]`, pinned by tests/engine/test_quant.py),
not in bf16, where GEMMs of different batch sizes round differently. Greedy rows take one batched argmax; the
processing order (repetition penalty, temperature, top-k, top-p) follows
transformers' generate, so results are comparable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from npcd.engine.api import SamplingParams


@dataclass
class SamplerState:
    params: SamplingParams
    seen: set[int] = field(default_factory=set)  # prompt + generated ids, for the repetition penalty
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0


def _penalize(row: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(seen), dtype=torch.long, device=row.device)
    picked = row.index_select(0, ids)
    row = row.clone()
    row[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return row


def _sample_row(row: torch.Tensor, state: SamplerState) -> int:
    p = state.params
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        row, index = torch.topk(row, p.top_k)
    else:
        index = None
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = sorted_logits
        index = order if index is None else index[order]
    choice = int(torch.multinomial(row.softmax(-1), 1, generator=state.generator))
    return int(index[choice]) if index is not None else choice


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[int]:
    """logits: [rows, vocab] fp32 on CPU; returns one token id per row."""
    greedy_ids = logits.argmax(dim=-1).tolist()
    out = []
    for i, state in enumerate(states):
        penalty = state.params.repetition_penalty
        if state.greedy and penalty == 1.0:
            out.append(greedy_ids[i])
            continue
        row = logits[i]
        if penalty != 1.0 and state.seen:
            row = _penalize(row, state.seen, penalty)
        out.append(int(row.argmax()) if state.greedy else _sample_row(row, state))
    return out
