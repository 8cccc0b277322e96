"""The server store: PostgreSQL with pgvector. A table per collection, an HNSW index (cosine),
idempotent upserts by chunk_id, pooled connections.

Two writers upserting overlapping keys in different orders can deadlock: rows are sorted by chunk_id
within every batch (and the writer's tenacity retry covers what remains). A new table is loaded
without an index and indexed once, by `optimize()`: building HNSW after a bulk load is ~10x faster
than inserting into an existing index.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.store import TABLE, Hit

HNSW_EF_SEARCH = 100  # candidates per search: recall over speed, like a brute-force scan


class PgStore:
    def __init__(self, url: str, model: str, collection: str = TABLE) -> None:
        from pgvector.psycopg import register_vector
        from psycopg_pool import ConnectionPool

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", collection):
            raise ConfigError(f"invalid collection name {collection!r}")
        self.table = f"embedpipe_{collection}"
        self.model = model
        self._dim: int | None = None

        def configure(conn: Any) -> None:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)

        self._pool = ConnectionPool(
            url, min_size=1, max_size=4, kwargs={"autocommit": True}, configure=configure, open=True
        )
        with self._pool.connection() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS embedpipe_collections (name text PRIMARY KEY, model text NOT NULL, dim int)"
            )
            row = conn.execute("SELECT model, dim FROM embedpipe_collections WHERE name = %s", (self.table,)).fetchone()
        if row is not None:
            if row[0] != model:
                self._pool.close()
                raise ConfigError(
                    f"table {self.table} holds vectors of model {row[0]!r}, not {model!r}; use another store"
                )
            self._dim = row[1]

    def _ensure_table(self, dim: int) -> None:
        if self._dim is not None:
            return
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (chunk_id text PRIMARY KEY, doc_id text NOT NULL, idx int,"
                f" text text, tokens int, char_start bigint, char_end bigint, metadata jsonb, embedding vector({dim}))"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_doc_id ON {self.table} (doc_id)")
            conn.execute(
                "INSERT INTO embedpipe_collections VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (self.table, self.model, dim),
            )
        self._dim = dim

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if not chunks:
            return
        if vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        self._ensure_table(vectors.shape[1])
        rows = sorted(
            (
                (
                    c.chunk_id,
                    c.doc_id,
                    c.index,
                    c.text,
                    c.tokens,
                    c.char_start,
                    c.char_end,
                    json.dumps(c.metadata, sort_keys=True),
                    np.asarray(v, dtype=np.float32),
                )
                for c, v in zip(chunks, vectors, strict=True)
            ),
            key=lambda r: r[0],  # one lock order for every writer: no deadlocks between them
        )
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chunk_id) DO UPDATE"
                " SET doc_id = excluded.doc_id, idx = excluded.idx, text = excluded.text, tokens = excluded.tokens,"
                " char_start = excluded.char_start, char_end = excluded.char_end, metadata = excluded.metadata,"
                " embedding = excluded.embedding",
                rows,
            )

    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if self._dim is None or not doc_ids:
            return out
        with self._pool.connection() as conn:
            for doc_id, chunk in conn.execute(
                f"SELECT doc_id, chunk_id FROM {self.table} WHERE doc_id = ANY(%s)", (list(doc_ids),)
            ):
                out[doc_id].add(chunk)
        return out

    def delete_chunks(self, chunk_ids: list[str]) -> None:
        if self._dim is not None and chunk_ids:
            with self._pool.connection() as conn:
                conn.execute(f"DELETE FROM {self.table} WHERE chunk_id = ANY(%s)", (sorted(chunk_ids),))

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if self._dim is None:
            return []
        query = np.asarray(vector, dtype=np.float32)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, k)}")
            rows = conn.execute(
                f"SELECT doc_id, chunk_id, idx, 1 - (embedding <=> %s) AS score, text, metadata FROM {self.table}"
                " ORDER BY embedding <=> %s LIMIT %s",
                (query, query, k),
            ).fetchall()
        return [Hit(doc_id=r[0], chunk_id=r[1], index=r[2], score=float(r[3]), text=r[4], metadata=r[5]) for r in rows]

    def count(self) -> int:
        if self._dim is None:
            return 0
        with self._pool.connection() as conn:
            return int(conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def vectors(self) -> dict[str, np.ndarray]:
        if self._dim is None:
            return {}
        with self._pool.connection() as conn:
            return {
                c: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)
                for c, v in conn.execute(f"SELECT chunk_id, embedding FROM {self.table}")
            }

    def optimize(self) -> None:
        """Build the HNSW index if the table has none yet: writers call this when a load has drained."""
        import psycopg

        if self._dim is None or self.has_index():
            return
        t = self.table
        try:
            with self._pool.connection() as conn:
                conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_cosine_ops)")
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            pass  # another writer built it at the same moment

    def has_index(self) -> bool:
        with self._pool.connection() as conn:
            return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{self.table}_hnsw",)).fetchone()[0]

    def close(self) -> None:
        self._pool.close()
