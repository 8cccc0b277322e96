"""The embedded default store: LanceDB on local disk. Collections are tables; store.json lists them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.metrics import STORE_WRITES
from shared.spec import EmbeddingSpec
from shared.store_types import DocRecord, Hit, choose_collection, stale_chunks

log = logging.getLogger(__name__)

OPTIMIZE_EVERY_WRITES = 50  # each LanceDB commit adds a fragment; compact from time to time
MANIFEST = "store.json"


def _metadata_column(chunks: list[Chunk]) -> list[str]:
    """Each chunk's metadata as JSON, encoded once per document (its chunks share the document's)."""
    by_doc: dict[str, str] = {}
    return [by_doc.get(c.doc_id) or by_doc.setdefault(c.doc_id, json.dumps(c.metadata, sort_keys=True)) for c in chunks]


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class LanceStore:
    """Collections are LanceDB tables: `<collection>` holds chunks and vectors, `<collection>__docs`
    the document records. store.json lists the collections with their specs and names the active one."""

    def __init__(self, path: Path, spec: EmbeddingSpec | None = None, collection: str | None = None) -> None:
        import lancedb

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # read_consistency_interval=0: every read sees the latest commit of any writer process
        self._db = lancedb.connect(str(path), read_consistency_interval=timedelta(0))
        manifest = self._manifest()
        self.collection = choose_collection(spec, collection, manifest["active"])
        known = manifest["collections"].get(self.collection or "")
        if collection is not None and spec is None and known is None:
            raise ConfigError(f"no collection {collection!r} in the store at {path}")
        self.spec = spec or (EmbeddingSpec.from_dict(known["spec"]) if known else None)
        self._tables: dict[str, Any] = {}
        self._writes = 0
        self._optimized_at_write = 0  # self._writes at the last compaction

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
                    "documents": len(handle.doc_ids()),
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
                schema = _schema(dim) if kind == "" else _docs_schema()
                self._tables[name] = self._db.create_table(name, schema=schema, exist_ok=True)
            else:
                return None
        return self._tables[name]

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ()) -> None:
        """Insert or update chunks by chunk_id. Documents in `complete` have all their chunks in this
        call: their other chunks (from an earlier version) go in the same commit, then their records
        are written (an unchanged resubmission is then skipped)."""
        import pyarrow as pa

        if not chunks:
            return
        if vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        table = self._table("", dim=vectors.shape[1])
        dim = vectors.shape[1]
        rows = pa.table(
            {
                "chunk_id": [c.chunk_id for c in chunks],
                "doc_id": [c.doc_id for c in chunks],
                "idx": [c.index for c in chunks],
                "text": [c.text for c in chunks],
                "tokens": [c.tokens for c in chunks],
                "char_start": [c.char_start for c in chunks],
                "char_end": [c.char_end for c in chunks],
                "metadata": _metadata_column(chunks),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dim
                ),
            },
            schema=_schema(dim),
        )
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
        if self._writes % OPTIMIZE_EVERY_WRITES == 0:
            self.optimize()

    def _holding_others(self, doc_ids: list[str], new: set[str]) -> list[str]:
        """Those of `doc_ids` with stored chunks other than `new` (stale ones, from an earlier version)."""
        return sorted(d for d, ids in self.chunk_ids(doc_ids).items() if ids - new) if doc_ids else []

    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]:
        table = self._table("")
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if table is None or not doc_ids:
            return out
        rows = table.search().where(f"doc_id IN ({_sql_list(doc_ids)})").select(["chunk_id", "doc_id"])
        for row in rows.limit(None).to_list():
            out[row["doc_id"]].add(row["chunk_id"])
        return out

    def delete_chunks(self, chunk_ids: list[str]) -> None:
        table = self._table("")
        if table is not None and chunk_ids:
            table.delete(f"chunk_id IN ({_sql_list(chunk_ids)})")
            STORE_WRITES.labels("delete").inc()

    # --- documents -----------------------------------------------------------------------------
    def doc_hashes(self, doc_ids: list[str]) -> dict[str, str]:
        table = self._table("__docs")
        if table is None or not doc_ids:
            return {}
        rows = table.search().where(f"doc_id IN ({_sql_list(doc_ids)})").select(["doc_id", "content_hash"])
        return {r["doc_id"]: r["content_hash"] for r in rows.limit(None).to_list()}

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
        if failed:
            docs.delete(f"doc_id IN ({_sql_list(failed)})")
        if done:
            self._record(done)
        return len(stale)

    def _record(self, done: list[DocRecord]) -> None:
        import pyarrow as pa

        docs = self._table("__docs", dim=0)
        if done:
            rows = pa.table(
                {
                    "doc_id": [d.doc_id for d in done],
                    "content_hash": [d.content_hash for d in done],
                    "chunks": [d.chunks for d in done],
                    "text": [d.text for d in done],
                    "metadata": [json.dumps(d.metadata, sort_keys=True) for d in done],
                    "updated": [time.time()] * len(done),
                },
                schema=_docs_schema(),
            )
            docs.merge_insert("doc_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
            STORE_WRITES.labels("documents").inc()

    def forget_documents(self, doc_ids: list[str]) -> int:
        """Delete documents and all their chunks; returns how many of them the collection held."""
        held = [d for d in doc_ids if d in self.doc_hashes(doc_ids)]
        stale = [cid for ids in self.chunk_ids(doc_ids).values() for cid in ids]
        self.delete_chunks(stale)
        docs = self._table("__docs")
        if docs is not None and doc_ids:
            docs.delete(f"doc_id IN ({_sql_list(doc_ids)})")
        return len(held)

    def doc_ids(self) -> set[str]:
        table = self._table("__docs")
        return set() if table is None else set(table.to_arrow().column("doc_id").to_pylist())

    def documents(self) -> Iterator[DocRecord]:
        table = self._table("__docs")
        if table is None:
            return
        for batch in table.to_arrow().to_batches(max_chunksize=1000):
            for r in batch.to_pylist():
                yield DocRecord(r["doc_id"], r["content_hash"], r["chunks"], r["text"], json.loads(r["metadata"]))

    # --- reading -------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        table = self._table("")
        if table is None:
            return []
        query = table.search(np.asarray(vector, dtype=np.float32)).distance_type("cosine").limit(k)
        rows = query.select(["chunk_id", "doc_id", "idx", "text", "metadata", "_distance"]).to_list()
        return [
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

    def count(self) -> int:
        table = self._table("")
        return 0 if table is None else table.count_rows()

    def vectors(self) -> dict[str, np.ndarray]:
        """Every stored vector by chunk_id (for tests and evaluation of small stores)."""
        table = self._table("")
        if table is None:
            return {}
        data = table.to_arrow().select(["chunk_id", "vector"]).to_pydict()
        return {c: np.asarray(v, dtype=np.float32) for c, v in zip(data["chunk_id"], data["vector"], strict=True)}

    def optimize(self, min_writes: int = 0) -> None:
        """Compact the collection's tables (LanceDB adds a fragment per commit); with `min_writes`, only
        once this handle committed that many writes since its last compaction."""
        if self._writes - self._optimized_at_write < min_writes:
            return
        self._optimized_at_write = self._writes
        for kind in ("", "__docs"):
            table = self._table(kind)
            if table is not None:
                table.optimize()

    def close(self) -> None:
        """Nothing to release: LanceDB holds no connection."""


def _docs_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("content_hash", pa.string()),
            pa.field("chunks", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("updated", pa.float64()),
        ]
    )


def _schema(dim: int) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("chunk_id", pa.string()),
            pa.field("doc_id", pa.string()),
            pa.field("idx", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("tokens", pa.int32()),
            pa.field("char_start", pa.int64()),
            pa.field("char_end", pa.int64()),
            pa.field("metadata", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )
