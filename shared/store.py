"""The vector store interface and its embedded default (LanceDB on local disk).

Writes are idempotent upserts by chunk_id, so a redelivered part never duplicates a row. Several
writer processes may write the same store at once (LanceDB commits optimistically and retries).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk

log = logging.getLogger(__name__)

TABLE = "chunks"
OPTIMIZE_EVERY_WRITES = 50  # each LanceDB commit adds a fragment; compact from time to time


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    index: int
    score: float  # cosine similarity
    text: str
    metadata: dict[str, Any]


class Store(Protocol):
    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]: ...
    def delete_chunks(self, chunk_ids: list[str]) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> list[Hit]: ...
    def count(self) -> int: ...
    def optimize(self) -> None: ...
    def close(self) -> None: ...


def open_store(location: str, model: str) -> Store:
    """A postgresql:// URL opens the pgvector store; a directory path the embedded LanceDB store."""
    if location.startswith(("postgresql://", "postgres://")):
        from shared.store_pg import PgStore

        return PgStore(location, model)
    if "://" in location:
        raise ConfigError(f"unsupported store {location!r}: use a directory path or a postgresql:// URL")
    return LanceStore(Path(location).expanduser(), model)


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class LanceStore:
    def __init__(self, path: Path, model: str) -> None:
        import lancedb

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.model = model
        self._check_model(path / "store.json", model)
        # read_consistency_interval=0: every read sees the latest commit of any writer process
        self._db = lancedb.connect(str(path), read_consistency_interval=timedelta(0))
        self._table: Any = None
        self._writes = 0

    @staticmethod
    def _check_model(manifest: Path, model: str) -> None:
        """One store holds vectors of one model: mixing models silently breaks search."""
        if manifest.is_file():
            stored = json.loads(manifest.read_text()).get("model")
            if stored != model:
                raise ConfigError(
                    f"the store at {manifest.parent} holds vectors of model {stored!r}, not {model!r}; "
                    "use another EMBEDPIPE_STORE for another model"
                )
        else:
            manifest.write_text(json.dumps({"model": model}) + "\n")

    def _open(self, dim: int | None = None) -> Any:
        if self._table is None:
            if TABLE in self._db.list_tables().tables:
                self._table = self._db.open_table(TABLE)
            elif dim is not None:
                self._table = self._db.create_table(TABLE, schema=_schema(dim), exist_ok=True)
        return self._table

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        import pyarrow as pa

        if not chunks:
            return
        if vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        table = self._open(dim=vectors.shape[1])
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
                "metadata": [json.dumps(c.metadata, sort_keys=True) for c in chunks],
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dim
                ),
            },
            schema=_schema(dim),
        )
        table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        self._writes += 1
        if self._writes % OPTIMIZE_EVERY_WRITES == 0:
            self.optimize()

    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]:
        table = self._open()
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if table is None or not doc_ids:
            return out
        rows = table.search().where(f"doc_id IN ({_sql_list(doc_ids)})").select(["chunk_id", "doc_id"])
        for row in rows.limit(None).to_list():
            out[row["doc_id"]].add(row["chunk_id"])
        return out

    def delete_chunks(self, chunk_ids: list[str]) -> None:
        table = self._open()
        if table is not None and chunk_ids:
            table.delete(f"chunk_id IN ({_sql_list(chunk_ids)})")

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        table = self._open()
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
        table = self._open()
        return 0 if table is None else table.count_rows()

    def vectors(self) -> dict[str, np.ndarray]:
        """Every stored vector by chunk_id (for tests and evaluation of small stores)."""
        table = self._open()
        if table is None:
            return {}
        data = table.to_arrow().select(["chunk_id", "vector"]).to_pydict()
        return {c: np.asarray(v, dtype=np.float32) for c, v in zip(data["chunk_id"], data["vector"], strict=True)}

    def optimize(self) -> None:
        table = self._open()
        if table is not None:
            table.optimize()

    def close(self) -> None:
        """Nothing to release: LanceDB holds no connection."""


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
