"""From a step's logits to text: sample each row, detokenize, stream deltas, decide who has finished."""

from __future__ import annotations

import time

import torch

from npcd.engine.api import FinishReason, TextDelta
from npcd.engine.sampler import sample
from npcd.engine.sequence import Sequence


class Postprocessor:
    def __init__(self, eos_ids: frozenset[int], max_seq_len: int):
        self.eos_ids, self.max_seq_len = eos_ids, max_seq_len
        self.tokens_generated = 0  # since start

    def process(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, FinishReason]]:
        """Appends one token to every live row and sends its new text; returns the rows that finished.

        A finishing row's last text is sent here too, so the caller only has to retire it.
        """
        ids = sample(logits.cpu(), [s.sampler for s in seqs])
        now = time.monotonic()
        finished: list[tuple[Sequence, FinishReason]] = []
        for seq, tok in zip(seqs, ids):
            if seq.done:
                continue
            seq.generated.append(tok)
            seq.sampler.seen.add(tok)
            self.tokens_generated += 1
            if len(seq.generated) == 1:
                seq.first_token_at = now
            if tok in self.eos_ids and not seq.request.sampling.ignore_eos:
                self._send(seq, seq.detok.flush())
                finished.append((seq, FinishReason.STOP))
                continue
            delta, stopped = seq.detok.push(tok)
            if stopped:
                self._send(seq, delta)
                finished.append((seq, FinishReason.STOP))
            elif len(seq.generated) >= seq.request.sampling.max_tokens or seq.length >= self.max_seq_len:
                self._send(seq, delta + seq.detok.flush())
                finished.append((seq, FinishReason.LENGTH))
            else:
                self._send(seq, delta)
        return finished

    @staticmethod
    def _send(seq: Sequence, text: str) -> None:
        if text:
            seq.sink(TextDelta(seq.request_id, text))
