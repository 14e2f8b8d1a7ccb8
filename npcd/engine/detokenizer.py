"""Turning a growing list of token ids into text deltas a game can print.

Byte-level BPE tokens are fragments of UTF-8: one emoji or one accented
letter may span several tokens. Decoding each token alone would print
replacement characters, so we decode a small window of recent tokens and
emit only the new text once it no longer ends in an incomplete character.

Stop strings are matched on the decoded text, across token boundaries, and
never reach the client: text that could be the start of a stop string is
held back until the next token tells which way it goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""        # everything decoded so far (may include held-back text)
    emitted: int = 0      # characters of `text` already sent
    _prefix: int = 0      # window start (token index)
    _read: int = 0        # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Adds a token; returns (text that is safe to send now, whether a stop string matched)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                return self._take(end), True
        return self._take(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever was held back was not a stop string."""
        return self._take(len(self.text))
