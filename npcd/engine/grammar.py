"""Grammar-constrained decoding: each row of a batch may follow its own JSON Schema.

The library is xgrammar: it compiles a JSON Schema into a grammar over the
tokenizer's vocabulary (once per schema text; its compiler caches), keeps one
matcher per request, and fills a row's bit mask of allowed next tokens in tens
of microseconds. Per step, `constrain` fills the masks of the constrained rows
only and applies them to those rows' logits before sampling; a row without a
grammar is never touched, so a free-text line's output is the same whether or
not constrained lines share its batch.

One addition of ours: the spoken line's budget. A JSON string may grow until
its maxLength, which `max_tokens` knows nothing about; once a row has spent
`max_tokens` tokens inside its streamed field, its mask is narrowed to the
tokens that start with a quote, which close the string (the grammar allows
nothing else that ends it), and the fields after it get STRUCTURE_TOKENS (npcd.engine.api) more.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from npcd.engine.api import InvalidRequest, StructuredOutput
from npcd.engine.reply_stream import ReplyStream

# Compiled grammars kept by xgrammar's compiler (a persona's reply grammar is ~100 KB); least recently used
# beyond this are compiled again when needed (~15 ms).
GRAMMAR_CACHE_BYTES = 64 << 20
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar prefixes its errors with its source location


class Grammars:
    """JSON Schemas compiled for one tokenizer. Thread-safe: requests are checked on the submitting thread,
    masks filled on the engine thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._quote: torch.Tensor | None = None  # packed mask of the tokens whose text starts with '"'

    def _ready(self) -> Any:
        """xgrammar and the vocabulary's token table load on the first structured request (~0.2 s), so
        a daemon whose game never asks for one pays nothing."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                quote = torch.zeros(self.vocab_size, dtype=torch.bool)
                for i, piece in enumerate(info.decoded_vocab[:self.vocab_size]):
                    quote[i] = piece.startswith(b'"')
                self._quote = pack(quote)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, schema: str) -> Any:
        """The compiled grammar of a schema text; InvalidRequest names what the compiler could not take."""
        compiler = self._ready()
        try:
            # any_whitespace=False: one space after ':' and ',' and none elsewhere, so the model never spends
            # tokens on layout and the reply has one form
            return compiler.compile_json_schema(schema, any_whitespace=False)
        except (RuntimeError, ValueError) as exc:
            message = _LOCATION.sub("", str(exc).strip())
            raise InvalidRequest(f"the JSON Schema cannot be compiled into a grammar: {message}") from None

    def row(self, structured: StructuredOutput, text_tokens: int) -> RowGrammar:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compile(structured.schema))
        assert self._quote is not None
        return RowGrammar(matcher, ReplyStream(structured.text_field), self._quote, text_tokens)


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """A bool vector over the vocabulary as xgrammar's bit mask: int32 words, bit j of word w is token 32w+j."""
    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@dataclass
class RowGrammar:
    """One request's grammar state: its matcher, its reply as read so far, and what is left of its line budget."""

    matcher: Any
    reply: ReplyStream
    quote: torch.Tensor
    text_tokens_left: int

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.reply.in_text and self.text_tokens_left <= 0:
            closing = bitmask[row] & self.quote
            if bool(closing.any()):  # inside an escape a quote may not be allowed yet; close a token later
                bitmask[row] = closing

    def accept(self, token: int) -> None:
        if self.reply.in_text:
            self.text_tokens_left -= 1
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} is outside the request's grammar")


class Constrainer:
    """Applies the constrained rows' masks to a step's logits; owns the reused bit mask buffer."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)

    def apply(self, logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> None:
        """logits: [rows, vocab] fp32 on the CPU, masked in place on the rows that have a grammar."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        import xgrammar as xgr

        if self._bitmask.shape[0] < len(grammars):
            self._bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        for i in rows:
            grammars[i].fill(self._bitmask, i)  # type: ignore[union-attr]
        xgr.apply_token_bitmask_inplace(logits, self._bitmask[:len(grammars)], vocab_size=self.vocab_size,
                                        indices=rows)
