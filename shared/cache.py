"""The embedding cache: chunk vectors by (embedding spec, hash of the text the model reads).

A chunk whose text did not change, in an edited document or in another document (boilerplate),
gets its vector from here instead of the model. Distributed: Redis keys that expire when unused for
cache_ttl_s, added only while Redis is below cache_redis_share of its maxmemory: the cache shares Redis
with the queues, whose `noeviction` must never be reached because of it (1M documents make ~6 GB of
cache). Embedded: SQLite beside the store, at most cache_max_entries (least recently used go).
Whatever is read back is checked (size, finite numbers): a bad entry counts as a miss. A cache write
Redis refuses is skipped and counted: the part goes on without it.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Protocol

import numpy as np
from redis import Redis
from redis.exceptions import ResponseError

from shared import keys as redis_keys
from shared.backpressure import RedisMemory
from shared.metrics import EMBED_CACHE_SKIPPED

log = logging.getLogger(__name__)

ROOM_CHECK_S = 5.0  # how often a worker reads Redis's memory (INFO) to know whether the cache may grow


def text_key(fingerprint: str, text: str) -> str:
    return fingerprint + ":" + hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class VectorCache(Protocol):
    def get_many(self, keys: list[str], dim: int) -> dict[str, np.ndarray]: ...
    def put_many(self, vectors: dict[str, np.ndarray]) -> None: ...


def _decode(raw: bytes | None, dim: int) -> np.ndarray | None:
    if raw is None or len(raw) != 4 * dim:
        return None
    vector = np.frombuffer(raw, dtype="<f4")
    return vector if np.isfinite(vector).all() else None


class RedisVectorCache:
    def __init__(self, redis: Redis, ttl_s: int, max_share: float = 0.5) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_share = max_share
        self.memory = RedisMemory(redis, ROOM_CHECK_S)
        self._room = True

    def has_room(self) -> bool:
        """Redis uses less than max_share of its maxmemory (always, without one); read every ROOM_CHECK_S."""
        share = self.memory.share()
        room = share is None or share < self.max_share
        if room != self._room:
            log.warning(
                "embedding cache: Redis at %.0f%% of its maxmemory: %s",
                100 * (share or 0),
                "storing new vectors again" if room else f"past {self.max_share:g} of it, new vectors not stored",
            )
        self._room = room
        return room

    def get_many(self, keys: list[str], dim: int) -> dict[str, np.ndarray]:
        if not keys:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.getex(redis_keys.vector_cache(key), ex=self.ttl_s)  # a hit keeps the entry alive
            raws = pipe.execute()
        found = {key: _decode(raw, dim) for key, raw in zip(keys, raws, strict=True)}
        return {k: v for k, v in found.items() if v is not None}

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        if not self.has_room():
            EMBED_CACHE_SKIPPED.labels("full").inc(len(vectors))
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, vector in vectors.items():
                    pipe.set(redis_keys.vector_cache(key), np.asarray(vector, dtype="<f4").tobytes(), ex=self.ttl_s)
                pipe.execute()
        except ResponseError as e:  # OOM past maxmemory, say: the part's vectors are good without the cache
            log.warning("embedding cache: %d new vectors not stored: %s", len(vectors), e)
            EMBED_CACHE_SKIPPED.labels("refused").inc(len(vectors))


class LocalVectorCache:
    EVICT_EVERY = 1000  # puts between evictions

    def __init__(self, path: Path, max_entries: int, ttl_s: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vcache (key TEXT PRIMARY KEY, vector BLOB, used REAL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS vcache_used ON vcache (used)")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._puts = 0
        self._evict()

    def get_many(self, keys: list[str], dim: int) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on parameters
            some = keys[start : start + 500]
            marks = ",".join("?" * len(some))
            for key, raw in self._db.execute(f"SELECT key, vector FROM vcache WHERE key IN ({marks})", some):
                vector = _decode(raw, dim)
                if vector is not None:
                    found[key] = vector
        if found:
            now = time.time()
            self._db.executemany("UPDATE vcache SET used = ? WHERE key = ?", [(now, k) for k in found])
        return found

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO vcache VALUES (?, ?, ?)",
            [(k, np.asarray(v, dtype="<f4").tobytes(), now) for k, v in vectors.items()],
        )
        self._puts += len(vectors)
        if self._puts >= self.EVICT_EVERY:
            self._puts = 0
            self._evict()

    def _evict(self) -> None:
        """Drop entries unused for ttl_s, then the least recently used beyond max_entries."""
        self._db.execute("DELETE FROM vcache WHERE used < ?", (time.time() - self.ttl_s,))
        excess = self._db.execute("SELECT count(*) FROM vcache").fetchone()[0] - self.max_entries
        if excess > 0:
            self._db.execute(
                "DELETE FROM vcache WHERE key IN (SELECT key FROM vcache ORDER BY used LIMIT ?)", (excess,)
            )

    def close(self) -> None:
        self._db.close()
