"""Where outcomes are recorded: dead letters and counters.

Distributed mode keeps them in Redis; the embedded mode keeps them in SQLite beside its store,
so `embedpipe failed` and `embedpipe status` work the same in both.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from redis import Redis

from shared import keys
from shared.messages import DeadLetter, decode_dead_letter, encode_dead_letter

MAX_KEPT_SOURCE_BYTES = 1_000_000  # a dead letter keeps its source for redrive up to this size


class Ledger(Protocol):
    def add_dead(self, letters: list[DeadLetter]) -> None: ...
    def clear_dead(self, doc_ids: Iterable[str]) -> None: ...
    def dead(self) -> list[DeadLetter]: ...
    def incr(self, **counts: int) -> None: ...
    def counters(self) -> dict[str, int]: ...


def stamped(letter: DeadLetter) -> DeadLetter:
    """Set the time and drop a source too large to keep."""
    source = letter.source
    if source is not None and len(source.get("content") or b"") + len(source.get("text") or "") > MAX_KEPT_SOURCE_BYTES:
        source = {k: v for k, v in source.items() if k not in ("content", "text")}
    return DeadLetter(**{**letter.__dict__, "at": letter.at or time.time(), "source": source})


class RedisLedger:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def add_dead(self, letters: list[DeadLetter], pipe: Any = None) -> None:
        if letters:
            target = pipe if pipe is not None else self.redis
            target.hset(keys.DEAD, mapping={d.doc_id: encode_dead_letter(stamped(d)) for d in letters})

    def clear_dead(self, doc_ids: Iterable[str], pipe: Any = None) -> None:
        ids = list(doc_ids)
        if ids:
            (pipe if pipe is not None else self.redis).hdel(keys.DEAD, *ids)

    def dead(self) -> list[DeadLetter]:
        return sorted((decode_dead_letter(v) for v in self.redis.hvals(keys.DEAD)), key=lambda d: d.at)

    def dead_count(self) -> int:
        return int(self.redis.hlen(keys.DEAD))

    def incr(self, pipe: Any = None, **counts: int) -> None:
        target = pipe if pipe is not None else self.redis
        for name, n in counts.items():
            target.hincrby(keys.COUNTERS, name, n)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(keys.COUNTERS).items()}


class LocalLedger:
    """SQLite file beside the embedded store; safe to share between the embedded runner's threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("CREATE TABLE IF NOT EXISTS dead (doc_id TEXT PRIMARY KEY, letter BLOB)")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")

    def add_dead(self, letters: list[DeadLetter]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO dead VALUES (?, ?)",
                [(d.doc_id, encode_dead_letter(stamped(d))) for d in letters],
            )

    def clear_dead(self, doc_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM dead WHERE doc_id = ?", [(d,) for d in doc_ids])

    def dead(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute("SELECT letter FROM dead").fetchall()
        return sorted((decode_dead_letter(r[0]) for r in rows), key=lambda d: d.at)

    def dead_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM dead").fetchone()[0])

    def incr(self, **counts: int) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(counts.items()),
            )

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())


def local_ledger_path(store: Path) -> Path:
    return store / "embedpipe-state.sqlite"
