"""The vector store interface: what every backend offers (the embedded default, LanceDB on local disk,
in shared/store_lance.py; pgvector in shared/store_pg.py), and what works on any of them.

A store holds collections, one per embedding spec (shared/spec.py); search reads the active one.
Writes are idempotent upserts by chunk_id, so a redelivered part never duplicates a row. Several
writer processes may write the same store at once (LanceDB commits optimistically and retries).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.spec import EmbeddingSpec

# Writers compact (`optimize`) when a load has drained. A compaction rewrites every small fragment, so
# it costs about the table, not what changed: after a drained load (with a fast embedder, after almost
# every batch) it is worth it only once a few commits went in. At 10,000 SciFact abstracts, compacting at
# every drain made the writer spend 0.21 CPU ms per chunk against 0.10 without (bench/fast.py).
OPTIMIZE_AFTER_DRAIN_WRITES = 10


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    index: int
    score: float  # cosine similarity
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class DocRecord:
    """What the store keeps about each document it holds, per collection: its content hash (to skip
    it when resubmitted unchanged) and its clean text (to re-embed it under a new spec)."""

    doc_id: str
    content_hash: str
    chunks: int
    text: str
    metadata: dict[str, Any]


class Store(Protocol):
    collection: str | None  # the collection this handle reads and writes (one per embedding spec)
    spec: EmbeddingSpec | None

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ()) -> None: ...
    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]: ...
    def delete_chunks(self, chunk_ids: list[str]) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> list[Hit]: ...
    def count(self) -> int: ...
    def optimize(self, min_writes: int = 0) -> None: ...
    def close(self) -> None: ...
    # documents of the collection (incremental processing)
    def doc_hashes(self, doc_ids: list[str]) -> dict[str, str]: ...
    def commit_documents(self, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int: ...
    def forget_documents(self, doc_ids: list[str]) -> int: ...
    def doc_ids(self) -> set[str]: ...
    def documents(self) -> Iterator[DocRecord]: ...
    # the collections of the store
    def collections(self) -> list[dict[str, Any]]: ...
    def active(self) -> str | None: ...
    def activate(self, name: str) -> None: ...
    def record_probe(self, result: dict[str, Any]) -> None: ...


def open_store(location: str, spec: EmbeddingSpec | None = None, collection: str | None = None) -> Store:
    """A postgresql:// URL opens the pgvector store; a directory path the embedded LanceDB store.

    With `spec`, the handle writes and reads the collection of that spec (created on the first
    write; the first collection of a store becomes the active one). With `collection`, that one.
    With neither, the active collection: the one search uses."""
    if location.startswith(("postgresql://", "postgres://")):
        from shared.store_pg import PgStore

        return PgStore(location, spec, collection)
    if "://" in location:
        raise ConfigError(f"unsupported store {location!r}: use a directory path or a postgresql:// URL")
    from shared.store_lance import LanceStore

    return LanceStore(Path(location).expanduser(), spec, collection)


def stale_chunks(stored: dict[str, set[str]], expected: dict[str, list[str]], failed: list[str]) -> list[str]:
    """Stored chunks of done documents that are not in their new chunk list, and every chunk of a
    failed document."""
    return [
        cid
        for doc_id, ids in stored.items()
        for cid in (ids if doc_id in failed else ids - set(expected.get(doc_id, ())))
    ]


def choose_collection(spec: EmbeddingSpec | None, collection: str | None, active: str | None) -> str | None:
    if collection is not None and not re.fullmatch(r"[a-z0-9_]{1,48}", collection):
        raise ConfigError(f"invalid collection name {collection!r}: see `embedpipe collections`")
    if spec is not None:
        if collection is not None and collection != spec.collection:
            raise ConfigError(f"collection {collection!r} does not hold vectors of this spec ({spec.collection})")
        return spec.collection
    return collection or active


def each_collection(location: str) -> Iterator[Store]:
    """A handle on every collection of the store, closed after use."""
    with_names = open_store(location)
    try:
        names = [c["name"] for c in with_names.collections()]
    finally:
        with_names.close()
    for name in names:
        store = open_store(location, collection=name)
        try:
            yield store
        finally:
            store.close()


def delete_documents(location: str, doc_ids: list[str]) -> dict[str, int]:
    """Remove documents and their chunks from every collection: {collection: documents removed}."""
    return {store.collection or "": store.forget_documents(doc_ids) for store in each_collection(location)}


def prune(location: str, kept: set[str]) -> dict[str, int]:
    """Sync: remove from every collection the documents not in `kept` (what the sources list now)."""
    if not kept:
        raise ConfigError("--prune with no documents listed would empty the store: refused")
    removed = {}
    for store in each_collection(location):
        gone = sorted(store.doc_ids() - kept)
        removed[store.collection or ""] = store.forget_documents(gone) if gone else 0
    return removed
