"""The embedded default store: LanceDB on local disk. Collections are tables; store.json lists them.

At scale: BTREE indexes on chunk_id and doc_id (the merge and the `doc_id IN (...)` lookups use them),
and an IVF_SQ vector index once a collection holds `ann_min_rows` chunks, trained again each time the
collection doubles. Both are kept current by the collection's maintenance (optimize): compaction of the
new fragments, which then join the BTREEs and, as a small delta index, the ANN index (which is no longer
rewritten whole each time). It runs in a child process started by the writer, under a file lock (one per
collection at a time, across processes): a write never waits on it nor grows with it, and a failed run
is logged, counted and tried again later. Search probes the ANN index and scans the rows not yet in it
(LanceDB's default), so it sees every row. IVF_SQ, because it builds fast: 4.5 s at 200k chunks of 384-d
on 2 cores, where IVF_HNSW_SQ took 181 s and IVF_PQ did not finish in 9 minutes at 600k. The maintenance
itself: shared/lance_maintenance.py."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.lance_rows import chunk_rows, chunk_schema, doc_rows, docs_schema
from shared.messages import Chunk
from shared.metrics import MAINTENANCE, STORE_WRITES
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store_types import DocRecord, Hit, choose_collection, metadata_matches, slices, stale_chunks

log = logging.getLogger(__name__)

OPTIMIZE_EVERY_WRITES = 50  # each LanceDB commit adds a fragment; compact (and index the new ones) from time to time
MANIFEST = "store.json"
SCALAR_INDEXED = {"": ("chunk_id", "doc_id"), "__docs": ("doc_id",)}
# The IVF partitions are trained on the rows there at the build; new rows join the nearest partition, so
# partitions grow with the table. Retrain once it holds this many times the trained rows.
ANN_RETRAIN_GROWTH = 2
ANN_RETRY_S = 60.0  # wait after a failed build
# Lance's buffers in the maintenance child, smaller than its defaults (the shuffle of an IVF build holds
# 128 MiB, a scan reads ahead up to 2 GiB, several fragments at once): the child training the IVF index
# over 1M chunks peaked at 481 MB instead of 653 (stop 30). One fragment read ahead at a time took the
# peak over 1M synthetic 384-d chunks (131,072-row fragments) from 622-778 to 454-460 MB; over a real
# store of 2.47M 256-d chunks it changed nothing (466 MB both ways): bench/README.md, stop 33.
MAINTENANCE_LANCE_ENV = {
    "LANCE_SHUFFLE_BATCH_BYTES": str(8 * 2**20),
    "LANCE_DEFAULT_IO_BUFFER_SIZE": str(64 * 2**20),
    "LANCE_DEFAULT_FRAGMENT_READAHEAD": "1",
}
METADATA_CACHE_BYTES = 64 * 2**20
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 2**20
STREAM_ROWS = 2000  # rows per page of the streaming readers: their memory is bounded by this, not the table


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class LanceStore:
    """Collections are LanceDB tables: `<collection>` holds chunks and vectors, `<collection>__docs`
    the document records. store.json lists the collections with their specs and names the active one."""

    def __init__(
        self,
        path: Path,
        spec: EmbeddingSpec | None = None,
        collection: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        import lancedb

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # read_consistency_interval=0: every read sees the latest commit of any writer process
        self.settings = settings or Settings()
        _bound_malloc(self.settings.malloc_arenas)  # before connect() starts LanceDB's threads
        self._db = lancedb.connect(
            str(path), read_consistency_interval=timedelta(0), session=lance_session(self.settings.index_cache_mb)
        )
        manifest = self._manifest()
        self.collection = choose_collection(spec, collection, manifest["active"])
        known = manifest["collections"].get(self.collection or "")
        if collection is not None and spec is None and known is None:
            raise ConfigError(f"no collection {collection!r} in the store at {path}")
        self.spec = spec or (EmbeddingSpec.from_dict(known["spec"]) if known else None)
        self._tables: dict[str, Any] = {}
        self._writes = 0
        self._optimized_at_write = 0  # self._writes at the last compaction
        self._indexed: set[str] = set()  # tables of this collection known to hold their scalar indexes
        self._maint: threading.Thread | None = None  # the running maintenance (see optimize)
        self._retry_at = 0.0  # after a failed maintenance: monotonic time of the next index build

    # --- the manifest: collections and the active one -----------------------------------------
    def _manifest(self) -> dict[str, Any]:
        file = self.path / MANIFEST
        data = json.loads(file.read_text()) if file.is_file() else {}
        if "collections" not in data:  # a new store (or one from before collections)
            data = {"collections": {}, "active": None}
        return data

    def _update_manifest(self, change: Any) -> None:
        """Read-modify-write store.json under a file lock: several writers may register at once."""
        import fcntl

        with open(self.path / ".store.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._manifest()
            change(data)
            tmp = self.path / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path / MANIFEST)

    def _register(self) -> None:
        if self.spec is None or self.collection is None:
            raise ConfigError("this store handle has no embedding spec: it cannot write")

        def add(data: dict[str, Any]) -> None:
            if self.collection not in data["collections"]:
                data["collections"][self.collection] = {"spec": self.spec.to_dict(), "created": time.time()}
                log.info("new collection %s (model %s)", self.collection, self.spec.model)
            if data["active"] is None:  # the first collection serves search from the start
                data["active"] = self.collection

        if self.collection not in self._manifest()["collections"]:
            self._update_manifest(add)

    def collections(self) -> list[dict[str, Any]]:
        data = self._manifest()
        out = []
        for name, entry in sorted(data["collections"].items(), key=lambda kv: kv[1].get("created", 0)):
            handle = LanceStore(self.path, collection=name)
            out.append(
                {
                    "name": name,
                    "active": name == data["active"],
                    "previous": name == data.get("previous"),
                    "chunks": handle.count(),
                    "documents": handle._count("__docs"),
                    **entry,
                }
            )
        return out

    def active(self) -> str | None:
        return self._manifest()["active"]

    def previous(self) -> str | None:
        return self._manifest().get("previous")

    def activate(self, name: str) -> None:
        def switch(data: dict[str, Any]) -> None:
            if name not in data["collections"]:
                raise ConfigError(f"no collection {name!r} in the store at {self.path}")
            if data["active"] != name:
                data["previous"] = data["active"]
            data["active"] = name

        self._update_manifest(switch)

    def record_probe(self, result: dict[str, Any]) -> None:
        def put(data: dict[str, Any]) -> None:
            if self.collection in data["collections"]:
                data["collections"][self.collection]["probe"] = result

        self._update_manifest(put)

    # --- tables ------------------------------------------------------------------------------
    def _table(self, kind: str, dim: int | None = None) -> Any:
        """The chunks ("") or documents ("__docs") table of the collection; None before the first
        write. A `dim` creates a missing table (the chunks table needs the vectors' dimension)."""
        if self.collection is None:
            return None
        name = self.collection + kind
        if name not in self._tables:
            if name in self._db.list_tables().tables:
                self._tables[name] = self._db.open_table(name)
            elif dim is not None:
                self._register()
                schema = chunk_schema(dim) if kind == "" else docs_schema()
                self._tables[name] = self._db.create_table(name, schema=schema, exist_ok=True)
            else:
                return None
        return self._tables[name]

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ()) -> None:
        """Insert or update chunks by chunk_id. Documents in `complete` have all their chunks in this
        call: their other chunks (from an earlier version) go in the same commit, then their records
        are written (an unchanged resubmission is then skipped)."""
        if not chunks:
            return
        if vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        table = self._table("", dim=vectors.shape[1])
        rows = chunk_rows(chunks, vectors)
        merge = table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all()
        # Complete documents replace their earlier chunks in this same commit. Deleting by source makes
        # the merge a full outer join over the table (4x a plain merge at 40k rows), so it is asked only
        # for documents that hold other chunks now: an edit, not a new document (the common case).
        replaced = self._holding_others([d.doc_id for d in complete], {c.chunk_id for c in chunks})
        if replaced:
            merge = merge.when_not_matched_by_source_delete(f"doc_id IN ({_sql_list(replaced)})")
        merge.execute(rows)
        STORE_WRITES.labels("upsert").inc()
        if complete:
            self._record(list(complete))
        self._writes += 1
        self._index_scalars("")
        self.optimize(OPTIMIZE_EVERY_WRITES)

    def _holding_others(self, doc_ids: list[str], new: set[str]) -> list[str]:
        """Those of `doc_ids` with stored chunks other than `new` (stale ones, from an earlier version)."""
        return sorted(d for d, ids in self.chunk_ids(doc_ids).items() if ids - new) if doc_ids else []

    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]:
        table = self._table("")
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if table is None:
            return out
        for piece in slices(doc_ids):
            rows = table.search().where(f"doc_id IN ({_sql_list(piece)})").select(["chunk_id", "doc_id"])
            for row in rows.limit(None).to_list():
                out[row["doc_id"]].add(row["chunk_id"])
        return out

    def delete_chunks(self, chunk_ids: list[str]) -> None:
        table = self._table("")
        if table is None:
            return
        for piece in slices(chunk_ids):
            table.delete(f"chunk_id IN ({_sql_list(piece)})")
            STORE_WRITES.labels("delete").inc()

    # --- documents -----------------------------------------------------------------------------
    def doc_hashes(self, doc_ids: list[str]) -> dict[str, str]:
        table = self._table("__docs")
        out: dict[str, str] = {}
        if table is None:
            return out
        for piece in slices(doc_ids):
            rows = table.search().where(f"doc_id IN ({_sql_list(piece)})").select(["doc_id", "content_hash"])
            out.update((r["doc_id"], r["content_hash"]) for r in rows.limit(None).to_list())
        return out

    def commit_documents(self, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int:
        """Finish documents whose chunks are all written: delete their stale chunks, record their
        hashes; remove every chunk and record of failed ones. Returns the chunks deleted."""
        if not done and not failed:
            return 0

        stale = stale_chunks(self.chunk_ids([*expected, *failed]), expected, failed)
        self.delete_chunks(stale)
        docs = self._table("__docs", dim=0 if done else None)
        if docs is None:
            return len(stale)
        for piece in slices(failed):
            docs.delete(f"doc_id IN ({_sql_list(piece)})")
        if done:
            self._record(done)
        return len(stale)

    def _record(self, done: list[DocRecord]) -> None:
        docs = self._table("__docs", dim=0)
        if done:
            docs.merge_insert("doc_id").when_matched_update_all().when_not_matched_insert_all().execute(doc_rows(done))
            STORE_WRITES.labels("documents").inc()
            self._index_scalars("__docs")

    def forget_documents(self, doc_ids: list[str]) -> int:
        """Delete documents and all their chunks, a slice at a time (chunks first: a record is never
        gone while chunks of it remain); returns how many of them the collection held."""
        chunks, docs = self._table(""), self._table("__docs")
        held = 0
        for piece in slices(doc_ids):
            held += len(self.doc_hashes(piece))
            where = f"doc_id IN ({_sql_list(piece)})"
            if chunks is not None:
                chunks.delete(where)
            if docs is not None:
                docs.delete(where)
            STORE_WRITES.labels("delete").inc()
        return held

    def doc_ids(self) -> Iterator[str]:
        for batch in self._stream("__docs", ["doc_id"]):
            yield from batch.column("doc_id").to_pylist()

    def documents(self) -> Iterator[DocRecord]:
        for batch in self._stream("__docs", ["doc_id", "content_hash", "chunks", "text", "metadata"]):
            for r in batch.to_pylist():
                yield DocRecord(r["doc_id"], r["content_hash"], r["chunks"], r["text"], json.loads(r["metadata"]))

    def _stream(self, kind: str, columns: list[str]) -> Iterator[Any]:
        """The table's rows, as of now, in record batches of at most STREAM_ROWS. Read a page at a
        time (offset and limit go down to the scan as a row range): a plain scan's reader reads ahead
        as far as it can, and held a whole 300 MB vector column for a slow consumer."""
        table = self._table(kind)
        if table is None:
            return
        pinned = self._db.open_table(table.name)
        pinned.checkout(table.version)  # one version for every page: writers may commit meanwhile
        for offset in range(0, pinned.count_rows(), STREAM_ROWS):
            yield from pinned.search().select(columns).offset(offset).limit(STREAM_ROWS).to_batches(STREAM_ROWS)

    def _count(self, kind: str) -> int:
        """Rows of a table, from its fragments' metadata (deletions subtracted): no scan."""
        table = self._table(kind)
        return 0 if table is None else table.count_rows()

    # --- reading -------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None) -> list[Hit]:
        table = self._table("")
        if table is None:
            return []
        query = self._query(table, vector, k)
        if where:  # metadata is a JSON string (sorted keys): LIKE narrows to a superset, checked below
            pairs = [json.dumps({key: value}, sort_keys=True)[1:-1] for key, value in where.items()]
            # `_` (any one character) for a backslash: LIKE's escape character never meets a JSON escape
            like = " AND ".join("metadata LIKE '%" + p.replace("\\", "_").replace("'", "''") + "%'" for p in pairs)
            query = query.where(like, prefilter=True).limit(2 * k)  # room for what LIKE's wildcards let in
        rows = query.to_list()
        hits = [
            Hit(
                doc_id=r["doc_id"],
                chunk_id=r["chunk_id"],
                index=r["idx"],
                score=1.0 - float(r["_distance"]),
                text=r["text"],
                metadata=json.loads(r["metadata"]),
            )
            for r in rows
        ]
        return [h for h in hits if metadata_matches(h.metadata, where)][:k]

    def _query(self, table: Any, vector: np.ndarray, k: int) -> Any:
        query = table.search(np.asarray(vector, dtype=np.float32)).distance_type("cosine").limit(k)
        # used where the table has the ANN index; the rows not yet in it are scanned (fast_search is off)
        query = query.nprobes(self.settings.search_nprobes)
        if self.settings.search_refine:
            query = query.refine_factor(self.settings.search_refine)
        return query.select(["chunk_id", "doc_id", "idx", "text", "metadata", "_distance"])

    def search_plan(self, vector: np.ndarray, k: int) -> str:
        """How search() would run this query (LanceDB's plan): ANN over the index, scan of the rest."""
        table = self._table("")
        return "" if table is None else self._query(table, vector, k).explain_plan(True)

    def count(self) -> int:
        return self._count("")

    def vectors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every stored (chunk_id, vector), streamed."""
        for batch in self._stream("", ["chunk_id", "vector"]):
            dim = batch.schema.field("vector").type.list_size
            flat = batch.column("vector").values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            yield from zip(batch.column("chunk_id").to_pylist(), flat.astype(np.float32), strict=True)

    # --- indexes -------------------------------------------------------------------------------
    def _index_scalars(self, kind: str) -> None:
        """Create the table's BTREE indexes once it exists (cached per handle; optimize keeps them current)."""
        from lancedb.index import BTree

        if kind in self._indexed:
            return
        table = self._table(kind)
        have = {c for i in table.list_indices() for c in i.columns}
        for column in SCALAR_INDEXED[kind]:
            if column not in have:
                try:
                    table.create_index(column, config=BTree(), replace=False)
                except Exception as e:  # another writer made it at the same moment: no harm
                    if not any(column in i.columns for i in table.list_indices()):
                        raise
                    log.debug("index on %s%s.%s made elsewhere: %s", self.collection, kind, column, e)
        self._indexed.add(kind)

    def index_stats(self) -> dict[str, dict[str, Any]]:
        """Each index of the chunks table: its type and how many rows it covers and does not yet."""
        table = self._table("")
        if table is None:
            return {}
        out = {}
        for index in table.list_indices():
            stats = table.index_stats(index.name)
            out[index.name] = {
                "type": stats.index_type,
                "indexed": stats.num_indexed_rows,
                "unindexed": stats.num_unindexed_rows,
            }
        return out

    def optimize(self, min_writes: int = 0) -> None:
        """Start the collection's maintenance in the background: compaction (LanceDB adds a fragment per
        commit; compacting adds the new ones to every index), and the ANN index's build once it is due.
        With `min_writes`, compaction only once this handle committed that many writes since the last."""
        if self._table("") is None or (self._maint is not None and self._maint.is_alive()):
            return
        compact = self._writes - self._optimized_at_write >= min_writes
        if not (compact or self._ann_due()):
            return
        if compact:
            self._optimized_at_write = self._writes
        self._maint = threading.Thread(target=self._maintain, name=f"maintain-{self.collection}", daemon=True)
        self._maint.start()

    def _ann_due(self) -> bool:
        """Past `ann_min_rows` chunks with no index yet, or grown ANN_RETRAIN_GROWTH times since its
        training. Cheap: the row count from the table's metadata, and store.json."""
        min_rows = self.settings.ann_min_rows
        if not min_rows or time.monotonic() < self._retry_at:
            return False
        return ann_due(self.count(), self._trained_rows(), min_rows)

    def _trained_rows(self) -> int:
        """The chunks the ANN index was last trained over (store.json), 0 before its first build."""
        return self._manifest()["collections"].get(self.collection or "", {}).get("ann_rows", 0)

    def _maintain(self) -> None:
        """Run the maintenance in a child process (python -m shared.lance_maintenance): an index build
        reads every vector, and memory a process once held stays with it, so the writer's own memory
        stays flat. A failure (never the writer's) is logged, counted, and the index build tried again
        after ANN_RETRY_S."""
        started = time.monotonic()
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shared.lance_maintenance",
                    str(self.path),
                    self.collection or "",
                    str(self.settings.ann_min_rows),
                ],
                capture_output=True,
                text=True,
                check=False,
                env=MAINTENANCE_LANCE_ENV | dict(os.environ),  # the operator's own settings win
            )
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
            MAINTENANCE.labels("ok").inc()
            log.info("%s: %s in %.1f s", self.collection, done.stdout.strip(), time.monotonic() - started)
        except Exception as e:
            MAINTENANCE.labels("failed").inc()
            self._retry_at = time.monotonic() + ANN_RETRY_S
            log.warning("maintenance of %s failed (index build retried in %.0f s): %s", self.collection, ANN_RETRY_S, e)

    def wait_for_index(self, timeout_s: float | None = None) -> None:
        """Wait for this handle's running maintenance (compaction, index build), if any; close() does."""
        if self._maint is not None:
            self._maint.join(timeout_s)

    def close(self) -> None:
        """LanceDB holds no connection; a running maintenance is let finish (a run ends indexed)."""
        self.wait_for_index()


def ann_due(rows: int, trained: int, min_rows: int) -> bool:
    """Past `min_rows` chunks with no index yet, or grown ANN_RETRAIN_GROWTH times since its training."""
    return bool(min_rows) and rows >= min_rows and (not trained or rows >= trained * ANN_RETRAIN_GROWTH)


@functools.cache
def lance_session(index_cache_mb: int = 256) -> Any:
    """One LanceDB session per process (and cache size), its caches bounded: LanceDB's defaults (6 GiB
    of index, 1 GiB of metadata) let a process grow with the store it reads."""
    import lancedb

    return lancedb.Session(
        index_cache_size_bytes=index_cache_mb * 2**20, metadata_cache_size_bytes=METADATA_CACHE_BYTES
    )


@functools.cache
def _bound_malloc(arenas: int) -> None:
    """Make glibc's malloc give back what LanceDB frees, for the threads started from now on (0: glibc's
    defaults). LanceDB's Rust code allocates with glibc malloc from ~30 threads: each thread took an arena
    of its own (up to 8 per core), and glibc raises its mmap threshold (up to 32 MiB) after the first
    large free, so Arrow and I/O buffers were carved from those arenas, fragmented them and stayed: a
    writer's RSS grew with the store while the heap in use did not (bench/README.md, store_scale). So: at
    most `arenas` arenas (M_ARENA_MAX), and blocks of MMAP_THRESHOLD_BYTES and more mmapped, unmapped when
    freed (M_MMAP_THRESHOLD, which also stops the threshold's rise). pyarrow's own allocations (the rows
    an upsert builds) go there too: its default pool, mimalloc, kept what it freed, 136 MB of a write
    worker at 71k documents and growing (bench/README.md, scale.py). Once per process; off glibc, only
    the pyarrow part."""
    if arenas <= 0:
        return
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    mallopt(M_ARENA_MAX, arenas)
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
