"""Conversations the daemon keeps for the game: NPC memory, persisted in SQLite, exported as a save-game blob.

A conversation is keyed by (owner, conversation id, persona): the owner is the
client's `x-npcd-client` name ("" without one), so two games sharing a daemon
never read each other's NPCs, and a game that reconnects (or restarts the
daemon) finds its conversations again.

Turns are numbered (`seq`) and never renumbered: the window (the first turn
prompts hold) and the summary's reach are turn numbers, so trimming the oldest
stored turns moves nothing. A turn the NPC answered also keeps `shown`, the
user turn exactly as the model saw it (context and lines since included): the
next prompt repeats it token for token, which is what lets the engine reuse the
conversation's keys and values (npcd.personas.prompt).

The standard library's sqlite3 in WAL mode with synchronous=NORMAL: a line's
turns are one transaction of a few inserts (~0.1 ms, no fsync per commit; a
power cut may lose the last lines, never corrupt the file). All calls come from
the daemon's event-loop thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from npcd.personas.prompt import Exchange

BLOB_MAGIC = b"NPCD-CONVERSATIONS\x00"  # an export blob starts with this, then a format version byte
BLOB_VERSION = 1
MAX_EXPANDED_BYTES = 256 << 20  # an import's JSON; a blob that inflates beyond is refused (a zip bomb)
MAX_SHOWN_CHARS = 200_000      # a stored user turn as the model saw it (context, lines since, the line)
RESIDENT = 256                 # conversations kept in memory; the rest are read from SQLite when used


class ConversationError(ValueError):
    """A conversation request or blob is wrong; the message names the field or the blob's path."""


class ConversationLimit(Exception):
    """An owner already holds the most conversations allowed (maps to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Key:
    owner: str
    conversation: str
    persona: str

    @property
    def cache_key(self) -> str:
        """The engine's prefix-cache key of this conversation (NUL cannot occur in the validated names)."""
        return f"{self.owner}\x00{self.conversation}\x00{self.persona}"


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    npc: bool = False   # said by this conversation's NPC (its replies)
    shown: str = ""     # a line the NPC answered: the user turn as the model saw it
    seq: int = 0        # its number in the conversation (assigned when stored)


@dataclass
class Conversation:
    key: Key
    turns: list[Turn] = field(default_factory=list)
    summary: str = ""
    summarized: int = 0  # turns with seq below this are what the summary stands for
    window: int = 0      # the first turn (seq) prompts hold
    next_seq: int = 0
    updated: float = 0.0

    def prompt_parts(self) -> tuple[list[Exchange], list[int], list[Turn]]:
        """What prompts build from: the exchanges of the turns from the window on (a run of others' lines,
        then the NPC's reply), the seq each exchange starts at, and the others' lines since the NPC's last
        reply (the new line's history)."""
        exchanges: list[Exchange] = []
        starts: list[int] = []
        group: list[Turn] = []
        for turn in self.turns:
            if turn.seq < self.window:
                continue
            if not turn.npc:
                group.append(turn)
                continue
            if group and group[-1].shown:
                user = group[-1].shown  # it holds the lines before it, as the template rendered them
            else:
                user = "\n".join(f"{t.speaker}: {t.text}" for t in group)
            exchanges.append(Exchange(user=user, reply=turn.text))
            starts.append(group[0].seq if group else turn.seq)
            group = []
        return exchanges, starts, group


def _turn_json(turn: Turn) -> dict[str, Any]:
    out: dict[str, Any] = {"speaker": turn.speaker, "text": turn.text}
    if turn.npc:
        out["npc"] = True
    if turn.shown:
        out["shown"] = turn.shown
    return out


class ConversationStore:
    """Conversations in SQLite (or in memory when `path` is None), with the most recently used held in memory."""

    def __init__(self, path: Path | None, *, max_turns: int, max_conversations: int, max_text_chars: int,
                 max_name_chars: int):
        self.path = path
        self.max_turns, self.max_conversations = max_turns, max_conversations
        self.max_text_chars, self.max_name_chars = max_text_chars, max_name_chars
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS conversations (
                owner TEXT NOT NULL, conversation TEXT NOT NULL, persona TEXT NOT NULL,
                summary TEXT NOT NULL DEFAULT '', summarized INTEGER NOT NULL DEFAULT 0,
                window INTEGER NOT NULL DEFAULT 0, next_seq INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL,
                PRIMARY KEY (owner, conversation, persona));
            CREATE TABLE IF NOT EXISTS turns (
                owner TEXT NOT NULL, conversation TEXT NOT NULL, persona TEXT NOT NULL, seq INTEGER NOT NULL,
                speaker TEXT NOT NULL, text TEXT NOT NULL, npc INTEGER NOT NULL, shown TEXT NOT NULL,
                PRIMARY KEY (owner, conversation, persona, seq));
        """)
        self._resident: OrderedDict[Key, Conversation] = OrderedDict()

    def close(self) -> None:
        self._db.close()

    # -- reading ----------------------------------------------------------------

    def get(self, key: Key) -> Conversation | None:
        conv = self._resident.get(key)
        if conv is not None:
            self._resident.move_to_end(key)
            return conv
        row = self._db.execute(
            "SELECT summary, summarized, window, next_seq, updated FROM conversations "
            "WHERE owner=? AND conversation=? AND persona=?", (key.owner, key.conversation, key.persona)).fetchone()
        if row is None:
            return None
        turns = [Turn(speaker=r[0], text=r[1], npc=bool(r[2]), shown=r[3], seq=r[4]) for r in self._db.execute(
            "SELECT speaker, text, npc, shown, seq FROM turns WHERE owner=? AND conversation=? AND persona=? "
            "ORDER BY seq", (key.owner, key.conversation, key.persona))]
        conv = Conversation(key, turns, summary=row[0], summarized=row[1], window=row[2], next_seq=row[3],
                            updated=row[4])
        self._remember(conv)
        return conv

    def get_or_new(self, key: Key) -> Conversation:
        """The conversation, or a new empty one (not stored until it has a turn)."""
        conv = self.get(key)
        if conv is not None:
            return conv
        held = self._db.execute("SELECT COUNT(*) FROM conversations WHERE owner=?", (key.owner,)).fetchone()[0]
        if held >= self.max_conversations:
            raise ConversationLimit(
                f"conversation: this client already keeps {held} conversations (limits.max_conversations); "
                f"reset some (ResetConversation) or import a save that holds fewer")
        return Conversation(key)

    def list(self, owner: str, persona: str = "") -> list[tuple[Key, int, float]]:
        """(key, turns, updated) of an owner's conversations, most recent first."""
        rows = self._db.execute(
            "SELECT c.conversation, c.persona, c.updated, (SELECT COUNT(*) FROM turns t WHERE t.owner=c.owner AND "
            "t.conversation=c.conversation AND t.persona=c.persona) FROM conversations c WHERE c.owner=? AND "
            "(?='' OR c.persona=?) ORDER BY c.updated DESC", (owner, persona, persona)).fetchall()
        return [(Key(owner, r[0], r[1]), r[3], r[2]) for r in rows]

    # -- writing ----------------------------------------------------------------

    def append(self, conv: Conversation, turns: Iterable[Turn]) -> None:
        """Stores new turns (numbered here); the oldest beyond max_turns are deleted."""
        new = []
        for turn in turns:
            new.append(Turn(turn.speaker, turn.text, turn.npc, turn.shown, conv.next_seq))
            conv.next_seq += 1
        if not new:
            return
        conv.turns.extend(new)
        excess = len(conv.turns) - self.max_turns
        if excess > 0:
            del conv.turns[:excess]
        with self._transaction():
            self._save_header(conv)
            self._db.executemany("INSERT INTO turns VALUES (?,?,?,?,?,?,?,?)", [self._row(conv.key, t) for t in new])
            if excess > 0:
                self._db.execute("DELETE FROM turns WHERE owner=? AND conversation=? AND persona=? AND seq<?",
                                 (*self._k(conv.key), conv.turns[0].seq))
        self._remember(conv)

    def set_window(self, conv: Conversation, window: int, summary: str | None = None,
                   summarized: int | None = None) -> None:
        """Moves the prompt window (and, when given, the summary and what it stands for)."""
        conv.window = window
        if summary is not None:
            conv.summary = summary
        if summarized is not None:
            conv.summarized = summarized
        if conv.turns or conv.summary:  # a conversation with nothing in it is not stored
            with self._transaction():
                self._save_header(conv)

    def replace(self, key: Key, turns: list[Turn], summary: str) -> Conversation:
        """The conversation becomes exactly `turns` and `summary` (an edit; both empty: a reset)."""
        if not turns and not summary:
            self.delete(key)
            return Conversation(key)
        old = self.get(key)
        conv = Conversation(key, summary=summary, next_seq=old.next_seq if old else 0)
        with self._transaction():
            self._delete_rows(key)
            self._write_new(conv, turns)
        self._remember(conv)
        return conv

    def delete(self, key: Key) -> bool:
        self._resident.pop(key, None)
        with self._transaction():
            existed = self._delete_rows(key)
        return existed

    # -- save games -------------------------------------------------------------

    def export(self, owner: str, persona: str = "") -> tuple[bytes, int]:
        convs = [self.get(key) for key, _, _ in self.list(owner, persona)]
        body = {"format": "npcd.conversations", "version": BLOB_VERSION, "conversations": [{
            "conversation": c.key.conversation, "persona": c.key.persona, "summary": c.summary,
            "turns": [_turn_json(t) for t in c.turns],
            # positions, not seq numbers: an import renumbers from 0
            "window": sum(1 for t in c.turns if t.seq < c.window),
            "summarized": sum(1 for t in c.turns if t.seq < c.summarized),
        } for c in convs if c is not None]}
        data = BLOB_MAGIC + bytes([BLOB_VERSION]) + zlib.compress(json.dumps(body, ensure_ascii=False).encode(), 6)
        return data, len(body["conversations"])

    def import_(self, owner: str, data: bytes, *, replace: bool) -> int:
        """Restores an export. Everything is checked before anything is written, in one transaction: a corrupt
        or foreign blob raises ConversationError and leaves what is stored as it was."""
        entries = self._parse(data)
        keys = {Key(owner, e["conversation"], e["persona"]) for e in entries}
        held = {k for k, _, _ in self.list(owner)}
        after = len(keys) if replace else len(held | keys)
        if after > self.max_conversations:
            raise ConversationError(f"data: the blob would leave {after} conversations; at most "
                                    f"{self.max_conversations} (limits.max_conversations)")
        with self._transaction():
            if replace:
                for key in held:
                    self._delete_rows(key)
            for e in entries:
                key = Key(owner, e["conversation"], e["persona"])
                self._delete_rows(key)
                turns = [Turn(t["speaker"], t["text"], bool(t.get("npc", False)), t.get("shown", ""))
                         for t in e["turns"]]
                conv = Conversation(key, summary=e["summary"])
                self._write_new(conv, turns, window=e["window"], summarized=e["summarized"])
        for key in list(self._resident):
            if key.owner == owner:
                del self._resident[key]
        return len(entries)

    def _parse(self, data: bytes) -> list[dict[str, Any]]:
        def bad(where: str, problem: str) -> ConversationError:
            return ConversationError(f"data{where}: {problem}")

        if not data.startswith(BLOB_MAGIC):
            raise bad("", "not an npcd conversations export (ExportConversations makes one)")
        version = data[len(BLOB_MAGIC):len(BLOB_MAGIC) + 1]
        if version != bytes([BLOB_VERSION]):
            raise bad("", f"export format version {version[0] if version else 'missing'}; this daemon reads "
                          f"version {BLOB_VERSION}")
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data[len(BLOB_MAGIC) + 1:], MAX_EXPANDED_BYTES)
            if inflater.unconsumed_tail:
                raise bad("", f"expands beyond {MAX_EXPANDED_BYTES} bytes")
            if not inflater.eof or inflater.unused_data:  # zlib checks its checksum only at the stream's end
                raise bad("", "corrupt (truncated, or bytes after the end)")
            body = json.loads(raw.decode("utf-8"))
        except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad("", f"corrupt ({type(exc).__name__}: {exc})") from None
        if not isinstance(body, dict) or body.get("format") != "npcd.conversations":
            raise bad("", "not an npcd conversations export")
        entries = body.get("conversations")
        if not isinstance(entries, list):
            raise bad(".conversations", "must be a list")
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(entries):
            where = f".conversations[{i}]"
            if not isinstance(e, dict):
                raise bad(where, "must be an object")
            for name in ("conversation", "persona"):
                self._check_name(e.get(name), f"{where}.{name}", bad)
            if (e["conversation"], e["persona"]) in seen:
                raise bad(where, f"conversation {e['conversation']!r} of {e['persona']!r} occurs twice")
            seen.add((e["conversation"], e["persona"]))
            summary = e.setdefault("summary", "")
            if not isinstance(summary, str) or len(summary) > self.max_text_chars:
                raise bad(f"{where}.summary", f"must be text of at most {self.max_text_chars} characters")
            turns = e.get("turns")
            if not isinstance(turns, list) or len(turns) > self.max_turns:
                raise bad(f"{where}.turns", f"must be a list of at most {self.max_turns} turns")
            for j, t in enumerate(turns):
                self._check_turn(t, f"{where}.turns[{j}]", bad)
            for name in ("window", "summarized"):
                value = e.setdefault(name, 0)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(turns):
                    raise bad(f"{where}.{name}", f"must be a turn position in 0..{len(turns)}")
        return entries

    def _check_name(self, value: Any, where: str, bad: Any) -> None:
        if not isinstance(value, str) or not value or len(value) > self.max_name_chars or "\x00" in value:
            raise bad(where, f"must be a name of 1..{self.max_name_chars} characters")

    def _check_turn(self, t: Any, where: str, bad: Any) -> None:
        if not isinstance(t, dict) or set(t) - {"speaker", "text", "npc", "shown"}:
            raise bad(where, "must be an object with speaker, text and optionally npc, shown")
        self._check_name(t.get("speaker"), f"{where}.speaker", bad)
        if not isinstance(t.get("text"), str) or len(t["text"]) > self.max_text_chars:
            raise bad(f"{where}.text", f"must be text of at most {self.max_text_chars} characters")
        if not isinstance(t.get("npc", False), bool):
            raise bad(f"{where}.npc", "must be true or false")
        if not isinstance(t.get("shown", ""), str) or len(t.get("shown", "")) > MAX_SHOWN_CHARS:
            raise bad(f"{where}.shown", f"must be text of at most {MAX_SHOWN_CHARS} characters")

    # -- internals ----------------------------------------------------------------

    def _write_new(self, conv: Conversation, turns: list[Turn], window: int = 0, summarized: int = 0) -> None:
        """Inside a transaction: a conversation with these turns, numbered from its next_seq; `window` and
        `summarized` are positions in `turns`."""
        base = conv.next_seq
        conv.turns = [Turn(t.speaker, t.text, t.npc, t.shown, base + i) for i, t in enumerate(turns)]
        conv.next_seq = base + len(turns)
        conv.window, conv.summarized = base + window, base + summarized
        self._save_header(conv)
        self._db.executemany("INSERT INTO turns VALUES (?,?,?,?,?,?,?,?)", [self._row(conv.key, t) for t in conv.turns])

    def _save_header(self, conv: Conversation) -> None:
        conv.updated = time.time()
        self._db.execute(
            "INSERT INTO conversations VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(owner, conversation, persona) DO UPDATE "
            "SET summary=excluded.summary, summarized=excluded.summarized, window=excluded.window, "
            "next_seq=excluded.next_seq, updated=excluded.updated",
            (*self._k(conv.key), conv.summary, conv.summarized, conv.window, conv.next_seq, conv.updated))

    def _delete_rows(self, key: Key) -> bool:
        self._resident.pop(key, None)
        self._db.execute("DELETE FROM turns WHERE owner=? AND conversation=? AND persona=?", self._k(key))
        return self._db.execute("DELETE FROM conversations WHERE owner=? AND conversation=? AND persona=?",
                                self._k(key)).rowcount > 0

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _remember(self, conv: Conversation) -> None:
        self._resident[conv.key] = conv
        self._resident.move_to_end(conv.key)
        while len(self._resident) > RESIDENT:
            self._resident.popitem(last=False)

    @staticmethod
    def _k(key: Key) -> tuple[str, str, str]:
        return key.owner, key.conversation, key.persona

    @staticmethod
    def _row(key: Key, t: Turn) -> tuple:
        return (key.owner, key.conversation, key.persona, t.seq, t.speaker, t.text, int(t.npc), t.shown)
