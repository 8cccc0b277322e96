"""Where outcomes are recorded: dead letters and counters.

Distributed mode keeps them in Redis; the embedded mode keeps them in SQLite beside its store,
so `embedpipe failed`, `status` and `redrive` work the same in both. A dead letter's source (what
is needed to redrive it) is kept apart from the listing, with its own retention.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgpack
from redis import Redis
from redis.client import Pipeline

from shared.keys import Keyspace
from shared.messages import DeadLetter, decode_dead_letter, encode_dead_letter
from shared.metrics import DEAD_LETTERS, RECENT_FAILURES_MAX

# A dead letter keeps its document for redrive up to this size (larger ones: submit them again from where
# they came from); with the letters' count and age bounded below, a flood of bad input cannot fill Redis.
MAX_KEPT_SOURCE_BYTES = 2_000_000
EXPIRE_BATCH = 1000  # dead letters removed per janitor round at most
READ_PAGE = 1000  # dead letters read per round trip when listing them


class Ledger(Protocol):
    def add_dead(self, letters: list[DeadLetter]) -> None: ...
    def clear_dead(self, doc_ids: Iterable[str]) -> None: ...
    def dead(self) -> list[DeadLetter]: ...
    def newest_dead(self) -> Iterator[DeadLetter]: ...
    def source(self, doc_id: str) -> dict[str, Any] | None: ...
    def dead_count(self) -> int: ...
    def incr(self, **counts: int) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def record_probe(self, result: dict[str, Any]) -> None: ...
    def last_probe(self) -> dict[str, Any]: ...


def _split(letter: DeadLetter) -> tuple[DeadLetter, bytes | None]:
    """The listing entry (no source, time set) and the packed source, if worth keeping."""
    source = letter.source
    packed = msgpack.packb(source, use_bin_type=True) if source else None
    if packed is not None and len(packed) > MAX_KEPT_SOURCE_BYTES:
        packed = None
    DEAD_LETTERS.labels(letter.stage, letter.reason).inc()
    return dataclasses.replace(letter, source=None, at=letter.at or time.time()), packed


class RedisLedger:
    def __init__(self, redis: Redis, ks: Keyspace, source_ttl_s: int = 30 * 86400) -> None:
        self.redis, self.keys = redis, ks
        self.source_ttl_s = source_ttl_s

    def add_dead(self, letters: list[DeadLetter], pipe: Pipeline | None = None) -> None:
        target = pipe if pipe is not None else self.redis.pipeline()
        for letter in letters:
            entry, source = _split(letter)
            target.hset(self.keys.DEAD, entry.doc_id, encode_dead_letter(entry))
            target.hincrby(self.keys.DEAD_ATTEMPTS, entry.doc_id, 1)
            target.zadd(self.keys.DEAD_RECENT, {entry.doc_id: entry.at})
            target.zadd(self.keys.DEAD_BY_TIME, {entry.doc_id: entry.at})
            if source is not None:
                target.set(self.keys.dead_source(entry.doc_id), source, ex=self.source_ttl_s)
        if letters:
            target.zremrangebyrank(self.keys.DEAD_RECENT, 0, -RECENT_FAILURES_MAX - 1)
        if pipe is None and letters:
            target.execute()

    def recent_dead(self) -> list[DeadLetter]:
        """The newest dead letters (at most RECENT_FAILURES_MAX), without reading them all."""
        ids = self.redis.zrevrange(self.keys.DEAD_RECENT, 0, RECENT_FAILURES_MAX - 1)
        raw = self.redis.hmget(self.keys.DEAD, ids) if ids else []
        return [decode_dead_letter(r) for r in raw if r is not None]

    def record_probe(self, result: dict[str, Any]) -> None:
        self.redis.hset(self.keys.PROBE, mapping={k: json.dumps(v) for k, v in result.items()})

    def last_probe(self) -> dict[str, Any]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.keys.PROBE).items()}

    def clear_dead(self, doc_ids: Iterable[str], pipe: Pipeline | None = None) -> None:
        ids = list(doc_ids)
        if ids:
            target = pipe if pipe is not None else self.redis.pipeline()
            target.hdel(self.keys.DEAD, *ids)
            target.hdel(self.keys.DEAD_ATTEMPTS, *ids)
            target.zrem(self.keys.DEAD_RECENT, *ids)
            target.zrem(self.keys.DEAD_BY_TIME, *ids)
            target.delete(*[self.keys.dead_source(d) for d in ids])
            if pipe is None:
                target.execute()

    def expire_dead(self, older_than_s: float, keep_at_most: int) -> int:
        """Forget dead letters older than `older_than_s` and the oldest beyond `keep_at_most` (a bounded
        round of at most EXPIRE_BATCH); returns how many went."""
        ids = self.redis.zrangebyscore(self.keys.DEAD_BY_TIME, "-inf", time.time() - older_than_s, 0, EXPIRE_BATCH)
        excess = self.redis.zcard(self.keys.DEAD_BY_TIME) - len(ids) - keep_at_most
        if excess > 0:
            ids += self.redis.zrange(self.keys.DEAD_BY_TIME, len(ids), len(ids) + min(excess, EXPIRE_BATCH) - 1)
        self.clear_dead(d.decode() for d in ids)
        return len(ids)

    def dead(self) -> list[DeadLetter]:
        attempts = {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.DEAD_ATTEMPTS).items()}
        letters = [decode_dead_letter(v) for v in self.redis.hvals(self.keys.DEAD)]
        return sorted((dataclasses.replace(d, attempts=attempts.get(d.doc_id, 1)) for d in letters), key=lambda d: d.at)

    def newest_dead(self) -> Iterator[DeadLetter]:
        """Dead letters, newest first, read READ_PAGE at a time (one round trip each): a listing that stops
        early reads only what it shows, however many letters there are."""
        start = 0
        while ids := self.redis.zrevrange(self.keys.DEAD_BY_TIME, start, start + READ_PAGE - 1):
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self.keys.DEAD, ids)
                pipe.hmget(self.keys.DEAD_ATTEMPTS, ids)
                letters, attempts = pipe.execute()
            for raw, n in zip(letters, attempts, strict=True):
                if raw is not None:  # cleared between the two reads
                    yield dataclasses.replace(decode_dead_letter(raw), attempts=int(n or 1))
            start += READ_PAGE

    def source(self, doc_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.dead_source(doc_id))
        return msgpack.unpackb(raw, raw=False) if raw else None

    def dead_count(self) -> int:
        return int(self.redis.hlen(self.keys.DEAD))

    def incr(self, pipe: Pipeline | None = None, /, **counts: int) -> None:
        target = pipe if pipe is not None else self.redis
        for name, n in counts.items():
            target.hincrby(self.keys.COUNTERS, name, n)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.COUNTERS).items()}

    def incr_lane(self, pipe: Pipeline, lane: str, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            pipe.hincrby(self.keys.lane_counters(lane), name, n)

    def lane_counters(self, lane: str) -> dict[str, int]:
        """One model's own counts (several models at once): its documents done may run ahead of the batch's."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.lane_counters(lane)).items()}


class LocalLedger:
    """SQLite file beside the embedded store; safe to share between the embedded runner's threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dead (doc_id TEXT PRIMARY KEY, letter BLOB, attempts INTEGER, source BLOB)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
        self._db.execute("CREATE TABLE IF NOT EXISTS probe (name TEXT PRIMARY KEY, value TEXT)")

    def add_dead(self, letters: list[DeadLetter]) -> None:
        rows = [(e.doc_id, encode_dead_letter(e), src) for e, src in map(_split, letters)]
        with self._lock:
            self._db.executemany(
                "INSERT INTO dead VALUES (?, ?, 1, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                "letter = excluded.letter, source = excluded.source, attempts = attempts + 1",
                rows,
            )

    def clear_dead(self, doc_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM dead WHERE doc_id = ?", [(d,) for d in doc_ids])

    def dead(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute("SELECT letter, attempts FROM dead").fetchall()
        letters = (dataclasses.replace(decode_dead_letter(r[0]), attempts=r[1]) for r in rows)
        return sorted(letters, key=lambda d: d.at)

    def newest_dead(self) -> Iterator[DeadLetter]:
        return reversed(self.dead())  # one local file: reading it whole is cheap enough

    def source(self, doc_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT source FROM dead WHERE doc_id = ?", (doc_id,)).fetchone()
        return msgpack.unpackb(row[0], raw=False) if row and row[0] else None

    def dead_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM dead").fetchone()[0])

    def record_probe(self, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO probe VALUES (?, ?)", [(k, json.dumps(v)) for k, v in result.items()]
            )

    def last_probe(self) -> dict[str, Any]:
        with self._lock:
            return {k: json.loads(v) for k, v in self._db.execute("SELECT name, value FROM probe").fetchall()}

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
