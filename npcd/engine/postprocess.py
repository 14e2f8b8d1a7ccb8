"""From a step's logits to text: sample each row, detokenize, stream deltas, decide who has finished."""

from __future__ import annotations

import time

import torch

from npcd.engine.api import FieldDone, FinishReason, TextDelta
from npcd.engine.grammar import Constrainer
from npcd.engine.sampler import sample
from npcd.engine.sequence import Sequence


class Postprocessor:
    def __init__(self, eos_ids: frozenset[int], max_seq_len: int, vocab_size: int):
        self.eos_ids, self.max_seq_len = eos_ids, max_seq_len
        self.constrainer = Constrainer(vocab_size)
        self.tokens_generated = 0  # since start

    def process(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, FinishReason]]:
        """Appends one token to every live row and sends its new text; returns the rows that finished.

        A finishing row's last text is sent here too, so the caller only has to retire it.
        """
        logits = logits.cpu()
        self.constrainer.apply(logits, [s.grammar for s in seqs])
        ids = sample(logits, [s.sampler for s in seqs])
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
            if seq.grammar is not None:
                if self._structured(seq, tok):
                    finished.append((seq, FinishReason.STOP))
                elif self._out_of_room(seq):
                    finished.append((seq, FinishReason.LENGTH))
                continue
            delta, stopped = seq.detok.push(tok)
            if stopped:
                self._send(seq, delta)
                finished.append((seq, FinishReason.STOP))
            elif self._out_of_room(seq):
                self._send(seq, delta + seq.detok.flush())
                finished.append((seq, FinishReason.LENGTH))
            else:
                self._send(seq, delta)
        return finished

    def _out_of_room(self, seq: Sequence) -> bool:
        """Its token budget is spent, or its KV slot is full: it ends with LENGTH."""
        return len(seq.generated) >= seq.token_budget or seq.length >= self.max_seq_len

    def _structured(self, seq: Sequence, tok: int) -> bool:
        """Feeds a constrained row's token through its grammar and reply stream; True once the JSON is closed
        (the row ends there, without spending a step on the end-of-turn token the grammar would allow next)."""
        grammar = seq.grammar
        assert grammar is not None
        grammar.accept(tok)
        delta, _ = seq.detok.push(tok)  # no stop strings: the grammar's end ends the line
        text, fields = grammar.reply.feed(delta)
        self._send(seq, text)
        for name, value in fields:
            if name != grammar.reply.text_field:  # that one went out as text
                seq.sink(FieldDone(seq.request_id, name, value))
        return grammar.reply.complete

    @staticmethod
    def _send(seq: Sequence, text: str) -> None:
        if text:
            seq.sink(TextDelta(seq.request_id, text))
