"""The server store: PostgreSQL with pgvector. Per collection a chunks table with an HNSW index
(cosine) and a documents table; `embedpipe_registry` lists the collections, their specs and the
active one. Idempotent upserts by chunk_id, pooled connections.

Two writers upserting overlapping keys in different orders can deadlock: rows are sorted by chunk_id
within every batch (and the writer's tenacity retry covers what remains). A new table is loaded
without the HNSW index and searched exactly; once a load has drained with `ann_min_rows` chunks in
the table, the index is built (building HNSW after a bulk load is ~10x faster than inserting into an
existing one), by `CREATE INDEX CONCURRENTLY` in a side thread of the writer: writes go on meanwhile,
and PostgreSQL keeps the index current after. Lookups by chunk_id and doc_id use btree indexes (the primary keys and
`<table>_doc_id`); the readers of whole tables stream through server-side cursors.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.metrics import MAINTENANCE, STORE_WRITES
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store_types import DocRecord, Hit, choose_collection, slices, stale_chunks

log = logging.getLogger(__name__)

ANN_RETRY_S = 60.0  # wait after a failed index build
STREAM_ROWS = 1000  # rows per fetch of the streaming readers
REGISTRY = "embedpipe_registry"
SCHEMA_LOCK = 0x656D6270  # an advisory lock key ("embp"): one process at a time changes the schema


def _lock_schema(conn: Any) -> None:
    """Serialise schema changes for the rest of the transaction. Two processes running `CREATE ... IF NOT
    EXISTS` at the same moment (a chunker and a writer starting on a new database) otherwise race, and
    one fails with a unique violation on PostgreSQL's own catalog."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))


HNSW_MAX_DIM = {"vector": 2000, "halfvec": 4000}  # pgvector's most dimensions an HNSW index holds


def hnsw_type(dim: int, settings: Settings) -> str | None:
    """What a collection's HNSW graph holds: EMBEDPIPE_HNSW_TYPE, halfvec where vector's 2,000 dimensions
    are too few (text-embedding-3-large's 3,072), None past halfvec's 4,000 (no index: exact search)."""
    kind = "halfvec" if settings.hnsw_type == "halfvec" or dim > HNSW_MAX_DIM["vector"] else "vector"
    return kind if dim <= HNSW_MAX_DIM[kind] else None


def hnsw_operand(kind: str, dim: int) -> str:
    """The expression the index is built on, and search must order by to use it: a halfvec index is one
    on the column cast to half precision; the table keeps float32."""
    return "embedding" if kind == "vector" else f"(embedding::halfvec({dim}))"


def hnsw_method(settings: Settings, dim: int) -> str:
    """The index method of a collection's HNSW index, with the graph's parameters from the settings."""
    kind = hnsw_type(dim, settings)
    assert kind, f"no HNSW index holds {dim} dimensions"
    m, ef = int(settings.hnsw_m), int(settings.hnsw_ef_construction)
    return f"USING hnsw ({hnsw_operand(kind, dim)} {kind}_cosine_ops) WITH (m = {m}, ef_construction = {ef})"


def hnsw_build_memory_mb(rows: int, dim: int, settings: Settings) -> int:
    """The build memory (maintenance_work_mem) for the graph of `rows` vectors: pgvector keeps each one's
    vector (4 bytes a dimension, 2 as halfvec) and 2m links of 16 bytes at the lowest layer, a few more
    above (measured: 512 MB held 312,212 rows of 256-d at m 16, 1,720 bytes each); a quarter more for the
    rows written during the build. At most EMBEDPIPE_HNSW_BUILD_MEMORY_MB: a parallel build takes all it
    is given at once, in /dev/shm."""
    per_row = (2 if hnsw_type(dim, settings) == "halfvec" else 4) * dim + 32 * int(settings.hnsw_m) + 192
    return min(int(settings.hnsw_build_memory_mb), max(64, math.ceil(1.25 * rows * per_row / 2**20)))


class PgStore:
    def __init__(
        self,
        url: str,
        spec: EmbeddingSpec | None = None,
        collection: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        from pgvector.psycopg import register_vector
        from psycopg_pool import ConnectionPool

        self.settings = settings or Settings()
        self._ann: threading.Thread | None = None  # the running HNSW build
        self._ann_next_check = 0.0  # after a failed build: monotonic time of the next try
        self._indexed: str | None = None  # what the valid HNSW index holds, once seen (vector, halfvec)
        self._pool = ConnectionPool(
            url, min_size=1, max_size=4, kwargs={"autocommit": True}, configure=register_vector, open=False
        )
        try:
            with self._pool.connection_class.connect(url, autocommit=True) as conn, conn.transaction():
                _lock_schema(conn)
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {REGISTRY} (name text PRIMARY KEY, spec jsonb NOT NULL, dim int,"
                    " created double precision, active boolean NOT NULL DEFAULT false, probe jsonb)"
                )
                # the collection active before the last switch (a store from before rollbacks lacks it)
                conn.execute(f"ALTER TABLE {REGISTRY} ADD COLUMN IF NOT EXISTS previous boolean NOT NULL DEFAULT false")
            self._pool.open()
            with self._pool.connection() as conn:
                active = conn.execute(f"SELECT name FROM {REGISTRY} WHERE active").fetchone()
                self.collection = choose_collection(spec, collection, active[0] if active else None)
                row = conn.execute(f"SELECT spec, dim FROM {REGISTRY} WHERE name = %s", (self.collection,)).fetchone()
            if collection is not None and spec is None and row is None:
                raise ConfigError(f"no collection {collection!r} in the store")
        except BaseException:
            self._pool.close()
            raise
        self.spec = spec or (EmbeddingSpec.from_dict(row[0]) if row else None)
        self._dim: int | None = row[1] if row else None
        self.table = f"embedpipe_{self.collection}"
        self.docs = f"{self.table}__docs"

    def _exists(self) -> bool:
        """The collection's tables exist. A handle opened before its first write (a long-lived worker's)
        looks again until they do (it kept seeing none: a re-run through the pools skipped no unchanged document)."""
        if self._dim is None:
            with self._pool.connection() as conn:
                row = conn.execute(f"SELECT spec, dim FROM {REGISTRY} WHERE name = %s", (self.collection,)).fetchone()
            if row:  # written in one transaction with the tables (_ensure_tables)
                self.spec = self.spec or EmbeddingSpec.from_dict(row[0])
                self._dim = row[1]
        return self._dim is not None

    def _ensure_tables(self, dim: int) -> None:
        if self._dim is not None:
            return
        if self.spec is None:
            raise ConfigError("this store handle has no embedding spec: it cannot write")
        with self._pool.connection() as conn, conn.transaction():
            _lock_schema(conn)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (chunk_id text PRIMARY KEY, doc_id text NOT NULL, idx int,"
                f" text text, tokens int, char_start bigint, char_end bigint, metadata jsonb, embedding vector({dim}))"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_doc_id ON {self.table} (doc_id)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.docs} (doc_id text PRIMARY KEY, content_hash text NOT NULL,"
                " chunks int, text text, metadata jsonb, updated double precision)"
            )
            conn.execute(
                f"INSERT INTO {REGISTRY} (name, spec, dim, created) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING",
                (self.collection, json.dumps(self.spec.to_dict()), dim, time.time()),
            )
            # the first collection of a store serves search from the start
            conn.execute(
                f"UPDATE {REGISTRY} SET active = true WHERE name = %s"
                f" AND NOT EXISTS (SELECT 1 FROM {REGISTRY} WHERE active)",
                (self.collection,),
            )
        self._dim = dim

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ()) -> None:
        """Insert or update chunks by chunk_id; documents in `complete` have all their chunks here:
        their other chunks are deleted and their records written, in the same transaction."""
        if not chunks:
            return
        if vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        self._ensure_tables(vectors.shape[1])
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
            if complete:
                ids = [c.chunk_id for c in chunks]
                cur.execute(
                    f"DELETE FROM {self.table} WHERE doc_id = ANY(%s) AND NOT chunk_id = ANY(%s)",
                    (sorted(d.doc_id for d in complete), ids),
                )
                self._record(cur, list(complete))
        STORE_WRITES.labels("upsert").inc()

    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if not self._exists() or not doc_ids:
            return out
        with self._pool.connection() as conn:
            for piece in slices(doc_ids):
                sql = f"SELECT doc_id, chunk_id FROM {self.table} WHERE doc_id = ANY(%s)"
                for doc_id, chunk in conn.execute(sql, (piece,)):
                    out[doc_id].add(chunk)
        return out

    def delete_chunks(self, chunk_ids: list[str]) -> None:
        if not self._exists():
            return
        with self._pool.connection() as conn:
            for piece in slices(sorted(chunk_ids)):
                conn.execute(f"DELETE FROM {self.table} WHERE chunk_id = ANY(%s)", (piece,))
                STORE_WRITES.labels("delete").inc()

    # --- documents -----------------------------------------------------------------------------
    def doc_hashes(self, doc_ids: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self._exists():
            return out
        with self._pool.connection() as conn:
            for piece in slices(doc_ids):
                sql = f"SELECT doc_id, content_hash FROM {self.docs} WHERE doc_id = ANY(%s)"
                out.update(conn.execute(sql, (piece,)).fetchall())
        return out

    def commit_documents(self, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int:
        """In one transaction: delete stale chunks of done documents and record their hashes; remove
        every chunk and record of failed ones. Returns the chunks deleted."""
        if not self._exists() or not (done or failed):
            return 0
        stale = sorted(stale_chunks(self.chunk_ids([*expected, *failed]), expected, failed))
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(f"DELETE FROM {self.table} WHERE chunk_id = ANY(%s)", (stale,))
            cur.execute(f"DELETE FROM {self.docs} WHERE doc_id = ANY(%s)", (sorted(failed),))
            self._record(cur, done)
        STORE_WRITES.labels("documents").inc()
        return len(stale)

    def _record(self, cur: Any, done: list[DocRecord]) -> None:
        cur.executemany(
            f"INSERT INTO {self.docs} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (doc_id) DO UPDATE SET"
            " content_hash = excluded.content_hash, chunks = excluded.chunks, text = excluded.text,"
            " metadata = excluded.metadata, updated = excluded.updated",
            sorted((d.doc_id, d.content_hash, d.chunks, d.text, json.dumps(d.metadata), time.time()) for d in done),
        )

    def forget_documents(self, doc_ids: list[str]) -> int:
        """Delete documents and all their chunks, one transaction per slice; returns how many it held."""
        held = 0
        if not self._exists():
            return held
        for piece in slices(sorted(doc_ids)):
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute(f"DELETE FROM {self.table} WHERE doc_id = ANY(%s)", (piece,))
                cur.execute(f"DELETE FROM {self.docs} WHERE doc_id = ANY(%s)", (piece,))
                held += cur.rowcount
            STORE_WRITES.labels("delete").inc()
        return held

    def doc_ids(self) -> Iterator[str]:
        for r in self._stream(f"SELECT doc_id FROM {self.docs}"):
            yield r[0]

    def documents(self) -> Iterator[DocRecord]:
        for r in self._stream(f"SELECT doc_id, content_hash, chunks, text, metadata FROM {self.docs} ORDER BY doc_id"):
            yield DocRecord(r[0], r[1], r[2], r[3], r[4])

    def _stream(self, sql: str) -> Iterator[Any]:
        """The query's rows through a server-side cursor, STREAM_ROWS per fetch."""
        if not self._exists():
            return
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(name="embedpipe_stream") as cur:
            cur.itersize = STREAM_ROWS
            cur.execute(sql)
            yield from cur

    # --- collections ---------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT name, spec, created, active, probe, previous FROM {REGISTRY} ORDER BY created"
            ).fetchall()
            out = []
            for name, spec, created, active, probe, previous in rows:
                table = f"embedpipe_{name}"
                chunks = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                docs = conn.execute(f"SELECT count(*) FROM {table}__docs").fetchone()[0]
                entry = {"name": name, "active": active, "previous": previous, "chunks": chunks, "documents": docs}
                entry["spec"] = spec
                out.append(entry | {"created": created} | ({"probe": probe} if probe else {}))
        return out

    def active(self) -> str | None:
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT name FROM {REGISTRY} WHERE active").fetchone()
        return row[0] if row else None

    def previous(self) -> str | None:
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT name FROM {REGISTRY} WHERE previous").fetchone()
        return row[0] if row else None

    def activate(self, name: str) -> None:
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(f"SELECT active FROM {REGISTRY} WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise ConfigError(f"no collection {name!r} in the store")
            if not row[0]:  # the active one becomes the previous one
                conn.execute(f"UPDATE {REGISTRY} SET previous = active, active = (name = %s)", (name,))

    def record_probe(self, result: dict[str, Any]) -> None:
        with self._pool.connection() as conn:
            conn.execute(f"UPDATE {REGISTRY} SET probe = %s WHERE name = %s", (json.dumps(result), self.collection))

    # --- reading -------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None) -> list[Hit]:
        rows = self._search(vector, k, "", where)
        return [Hit(doc_id=r[0], chunk_id=r[1], index=r[2], score=float(r[3]), text=r[4], metadata=r[5]) for r in rows]

    def search_plan(self, vector: np.ndarray, k: int) -> str:
        """PostgreSQL's plan of search(): an index scan of the HNSW index once it is there."""
        return "\n".join(r[0] for r in self._search(vector, k, "EXPLAIN "))

    def _search(self, vector: np.ndarray, k: int, explain: str, where: Mapping[str, Any] | None = None) -> list[Any]:
        if not self._exists():
            return []
        query = np.asarray(vector, dtype=np.float32)
        filtered = " WHERE metadata @> %s::jsonb" if where else ""  # containment: every field, that value
        kind = self._indexed or self._index_kind() or "vector"  # exact scans in full precision
        operand = hnsw_operand(kind, len(query))
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"SET LOCAL hnsw.ef_search = {max(int(self.settings.ef_search), k)}")
            return conn.execute(
                f"{explain}SELECT doc_id, chunk_id, idx, 1 - (embedding <=> %s) AS score, text, metadata"
                f" FROM {self.table}{filtered} ORDER BY {operand} <=> %s::{kind} LIMIT %s",
                (query, *([json.dumps(dict(where))] if where else []), query, k),
            ).fetchall()

    def count(self) -> int:
        if not self._exists():
            return 0
        with self._pool.connection() as conn:
            return int(conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def vectors(self) -> Iterator[tuple[str, np.ndarray]]:
        for c, v in self._stream(f"SELECT chunk_id, embedding FROM {self.table}"):
            yield c, np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)

    def optimize(self, min_writes: int = 0) -> None:
        """Start the HNSW index's build in a side thread if the table holds `ann_min_rows` chunks and has
        none yet. Writers call this when a load has drained (at once, whatever `min_writes`: the index is
        built once), not while writing: every row written after the build pays its insertion into the
        graph, 78x the cost of a part without it (bench/README.md), so a bulk load is indexed after."""
        min_rows = self.settings.ann_min_rows
        if not self._exists() or not min_rows or (self._ann is not None and self._ann.is_alive()) or self.has_index():
            return
        if time.monotonic() < self._ann_next_check:
            return  # a build failed a moment ago, or none can be
        if hnsw_type(self._dim or 0, self.settings) is None:
            log.warning("%s: %s dimensions, more than an HNSW index holds: searched exactly", self.table, self._dim)
            self._ann_next_check = math.inf  # nothing to retry
            return
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]
        if rows >= min_rows:
            self._ann = threading.Thread(
                target=self._build_ann, args=(rows,), name=f"hnsw-{self.collection}", daemon=True
            )
            self._ann.start()

    def _build_ann(self, rows: int) -> None:
        """CREATE INDEX CONCURRENTLY (writes go on), under an advisory lock: one build per table. An
        interrupted concurrent build leaves an invalid index: dropped first. A failure is logged,
        counted and retried after ANN_RETRY_S, at the next drain."""
        import psycopg

        t, index = self.table, f"{self.table}_hnsw"
        try:
            with psycopg.connect(self._pool.conninfo, autocommit=True) as conn:
                if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (index,)).fetchone()[0]:
                    return  # another process builds it
                if self.has_index():
                    return
                started = time.monotonic()
                memory_mb = hnsw_build_memory_mb(rows, self._dim or 0, self.settings)
                conn.execute(f"SET maintenance_work_mem = '{memory_mb}MB'")
                conn.add_notice_handler(self._log_memory_notice)
                try:
                    self._create_index(conn)
                except psycopg.errors.DiskFull as e:
                    if "shared memory" not in str(e):
                        raise
                    # a parallel build keeps its graph in /dev/shm, 64 MB in a container by default
                    log.warning(
                        "HNSW build of %s: the server's /dev/shm cannot hold the parallel build's graph (%s MB):"
                        " building in one process; give it /dev/shm >= EMBEDPIPE_HNSW_BUILD_MEMORY_MB (%s)",
                        t,
                        memory_mb,
                        e,
                    )
                    conn.execute("SET max_parallel_maintenance_workers = 0")
                    self._create_index(conn)
            MAINTENANCE.labels("ok").inc()
            log.info(
                "HNSW index of %s built in %.1f s (%d rows, %d MB)", t, time.monotonic() - started, rows, memory_mb
            )
        except Exception as e:  # never the writer's failure: counted, logged, tried again later
            MAINTENANCE.labels("failed").inc()
            self._ann_next_check = time.monotonic() + ANN_RETRY_S
            log.warning("HNSW index build of %s failed (retried in %.0f s): %s", t, ANN_RETRY_S, e)

    def _log_memory_notice(self, notice: Any) -> None:
        """pgvector says when the graph outgrows the build memory: it inserts ~9x slower from there."""
        if "maintenance_work_mem" in (notice.message_primary or ""):
            log.warning("HNSW build of %s: %s (EMBEDPIPE_HNSW_BUILD_MEMORY_MB)", self.table, notice.message_primary)

    def _create_index(self, conn: Any) -> None:
        """Drop what a failed build left (an invalid index), then build."""
        index = f"{self.table}_hnsw"
        conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
        conn.execute(f"CREATE INDEX CONCURRENTLY {index} ON {self.table} {hnsw_method(self.settings, self._dim or 0)}")

    def has_index(self) -> bool:
        """The HNSW index exists and is valid (a concurrent build in progress, or one that failed, is not)."""
        return self._index_kind() is not None

    def _index_kind(self) -> str | None:
        """What the valid HNSW index holds (vector or halfvec: its operator class), None without one. Kept
        for search, which must order by the index's own expression or PostgreSQL scans the table."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT i.indisvalid, o.opcname FROM pg_index i JOIN pg_opclass o ON o.oid = i.indclass[0]"
                " WHERE i.indexrelid = to_regclass(%s)",
                (f"{self.table}_hnsw",),
            ).fetchone()
        self._indexed = row[1].removesuffix("_cosine_ops") if row and row[0] else None
        return self._indexed

    def wait_for_index(self, timeout_s: float | None = None) -> None:
        """Wait for this handle's running index build, if any (close() does)."""
        if self._ann is not None:
            self._ann.join(timeout_s)

    def close(self) -> None:
        self.wait_for_index()
        self._pool.close()
