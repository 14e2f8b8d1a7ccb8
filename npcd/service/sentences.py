"""A line's text cut into sentences (or clauses) as it streams, for text-to-speech.

A game's TTS can start speaking the first sentence while the NPC is still
generating the rest, but only if it gets whole sentences: half a sentence sounds
wrong, and waiting for the whole line wastes the streaming. `Segmenter` is fed a
line's text deltas and hands back each piece the moment it is certain to be
complete; `finish` hands back the rest.

What is pinned (tests/service/test_sentences.py):

* The pieces, concatenated in index order, are exactly the line's text, spaces
  included. The whitespace after a boundary belongs to the piece it ends
  ("Hi. " + "Bye."), so every piece but the first starts with a visible
  character, and a piece is sent once the first character after that whitespace
  is known (with BPE tokens, the same delta that brings the space).
* The pieces do not depend on how the text was chunked into deltas: a cut is
  decided only once every character it depends on has arrived.
* A boundary is a run of marks (with closing quotes and brackets right after
  them, never cut between ! and "). A run that ends in a closing quote or
  bracket followed by a lowercase word is a dialogue tag, no boundary:
  `"Stop!" he said.` is one sentence, `"Stop!" She ran.` two.
  Marks that also occur inside numbers, abbreviations and words (ASCII, Latin
  and the General / Supplemental Punctuation blocks: . ! ? ... and dashes) end
  a piece only before whitespace, so 3.5, e.g., U.S.A and 1990-2000 stay
  whole; "Wait... what?" does split after the "... ". All other marks (CJK and
  fullwidth, Arabic, Devanagari: 。！？，、 ؟ ، । ॥ ...) end a piece right away,
  except one between two digits (10：30).
* A single "." after a known abbreviation (ABBREVIATIONS: Mr. Dr. St. etc.), a
  dotted one (e.g. i.e. a.m. U.S.) or an initial (J. R. R. Tolkien) is no
  boundary.
* Clause mode also cuts at CLAUSE_MARKS, but only once the clause holds at least
  MIN_CLAUSE_WORDS words (each CJK character counts as one), so TTS never gets a
  lone "Yes, ": a too-short clause runs on into the next.
* No piece is only punctuation or whitespace: marks, emoji and the like between a
  boundary and the next word go with the piece before, up to the last
  whitespace among them ("Hello. ... " + "World."), and a line's trailing ones
  end its last piece.

The mark sets are module constants, the daemon's defaults; npcd.yaml can replace
them (`sentence_marks`, `clause_marks`).
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

# . ! ? ... double marks, the ideographic / halfwidth / fullwidth stops, ! and ?, the Arabic question mark and
# full stop (Urdu), the Devanagari danda and double danda
SENTENCE_MARKS = ".!?\u2026\u203c\u2047\u2048\u2049\u3002\uff61\uff01\uff1f\u061f\u06d4\u0964\u0965"
# , ; : en dash, em dash, horizontal bar, the fullwidth / ideographic comma, semicolon and colon, the Arabic comma
# and semicolon
CLAUSE_MARKS = ",;:\u2013\u2014\u2015\uff0c\u3001\uff1b\uff1a\u060c\u061b"
# compared lowercased with the word before a single "."
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "prof", "jr", "sr", "mt", "vs", "etc", "cf", "approx"})
MIN_CLAUSE_WORDS = 2

_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # e.g, i.e, a.m, U.S (the final "." is the mark itself)


class Piece(NamedTuple):
    index: int  # 0, 1, 2 ... within the line
    text: str


def marks_problem(marks: str) -> str | None:
    """Why `marks` cannot be a set of boundary marks (None when it can): a letter, digit or space would cut
    words apart."""
    if not marks:
        return "must not be empty"
    for c in marks:
        if _is_word_char(c) or c.isspace():
            return f"must hold only punctuation marks, got {c!r} (U+{ord(c):04X})"
    return None


def _is_word_char(c: str) -> bool:
    """Letters, digits and combining marks (Devanagari vowel signs are not alnum, yet part of a word)."""
    return c.isalnum() or unicodedata.category(c).startswith("M")


def _needs_space(mark: str) -> bool:
    """Marks of the scripts that also use them inside numbers, abbreviations and words."""
    code = ord(mark)
    return code < 0x0370 or 0x2000 <= code < 0x2070 or 0x2E00 <= code < 0x2E80


def _is_closer(c: str) -> bool:
    """A closing quote or bracket: it stays with the mark before it."""
    return c in "\"'\uff02\uff07" or unicodedata.category(c) in ("Pe", "Pf")


def _words(text: str) -> int:
    """Words of `text`: runs of word characters, and each wide (CJK) one on its own."""
    count, inside = 0, False
    for c in text:
        if not _is_word_char(c):
            inside = False
        elif unicodedata.east_asian_width(c) in ("W", "F"):
            count, inside = count + 1, False
        elif not inside:
            count, inside = count + 1, True
    return count


def _abbreviation(text: str, dot: int) -> bool:
    """Whether the "." at `dot` ends an abbreviation or an initial rather than a sentence."""
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:dot]
    if start > 0 and _is_word_char(text[start - 1]):  # 21st. is no abbreviation
        return False
    return (word.lower() in ABBREVIATIONS or _DOTTED.fullmatch(word) is not None
            or (len(word) == 1 and word.isupper()))


class Segmenter:
    """One line's pieces, fed its text deltas in order (see the module docstring for the rules)."""

    def __init__(self, *, clauses: bool = False, sentence_marks: str = SENTENCE_MARKS,
                 clause_marks: str = CLAUSE_MARKS):
        self._sentence = frozenset(sentence_marks)
        self._marks = self._sentence | frozenset(clause_marks) if clauses else self._sentence
        self._text = ""
        self._start = 0  # where the piece being built starts (everything before it was sent)
        self._scan = 0   # where scanning resumes: the marks between _start and here are decided non-boundaries
        self._count = 0

    def feed(self, delta: str) -> list[Piece]:
        """The pieces `delta` completed, in order (often none)."""
        self._text += delta
        return self._cuts()

    def finish(self, final_text: str) -> list[Piece]:
        """The rest of the line: the pieces the final text completes, then what remains (when anything does).
        The cover is exact even when `final_text` goes beyond the deltas fed: it is taken from where the
        pieces sent so far end."""
        self._text = final_text
        pieces = self._cuts()
        if self._start < len(final_text):
            pieces.append(self._piece(len(final_text)))
        return pieces

    def _piece(self, end: int) -> Piece:
        piece = Piece(self._count, self._text[self._start:end])
        self._count += 1
        self._start = self._scan = end
        return piece

    def _cuts(self) -> list[Piece]:
        pieces = []
        while (cut := self._next_cut()) is not None:
            pieces.append(self._piece(cut))
        return pieces

    def _next_cut(self) -> int | None:
        """Where the piece being built ends, once that is certain; None while more text could change it."""
        text, n = self._text, len(self._text)
        i = self._scan
        while i < n:
            if text[i] not in self._marks:
                i += 1
                continue
            self._scan = i  # undecided runs are looked at again with more text
            j = i
            while j < n and (text[j] in self._marks or _is_closer(text[j])):
                j += 1
            if j == n:  # the run may go on
                return None
            if not self._boundary(i, j):
                i = self._scan = j
                continue
            word = j
            while word < n and not _is_word_char(text[word]):
                word += 1
            if word == n:  # punctuation or spaces so far: they may still belong to this piece
                return None
            if _is_closer(text[j - 1]) and text[word].islower():  # "Stop!" he said: the tag goes on
                i = self._scan = j
                continue
            spaces = [k for k in range(j, word) if text[k].isspace()]
            return spaces[-1] + 1 if spaces else j
        self._scan = n
        return None

    def _boundary(self, i: int, j: int) -> bool:
        """Whether the run of marks and closers text[i:j] (text[j] known) ends the piece being built."""
        text = self._text
        marks = [c for c in text[i:j] if c in self._marks]
        if all(_needs_space(c) for c in marks):
            if not text[j].isspace() or (text[i:j] == "." and _abbreviation(text, i)):
                return False
        elif len(marks) == 1 and j - i == 1 and i > 0 and text[i - 1].isdigit() and text[j].isdigit():
            return False  # 10：30
        clause = not any(c in self._sentence for c in marks)  # clause marks alone
        return _words(text[self._start:i]) >= (MIN_CLAUSE_WORDS if clause else 1)
