"""The vector store's interface: the Store protocol every backend implements (everything callers use),
the records it returns, and the helpers both backends share. Apart from shared/store.py (which opens a
backend) so that the backends can import it without an import cycle."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.spec import EmbeddingSpec

# IDs per lookup or delete: the stores cut every list of IDs they are given into slices of this many, so
# no caller (a migration's millions of documents, a prune) builds an unbounded `IN (...)` filter or array.
ID_SLICE = 1000


def slices(ids: Iterable[str]) -> Iterator[list[str]]:
    """`ids` (a list or a stream) in lists of at most ID_SLICE, read at each call (tests shrink it)."""
    piece: list[str] = []
    for i in ids:
        piece.append(i)
        if len(piece) >= ID_SLICE:
            yield piece
            piece = []
    if piece:
        yield piece


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
    """Everything callers use of a store handle: one collection's chunks and document records, and the
    collections of the store. LanceStore and PgStore implement it; shared.store.open_store returns one."""

    collection: str | None  # the collection this handle reads and writes (one per embedding spec)
    spec: EmbeddingSpec | None

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ...) -> None: ...
    def chunk_ids(self, doc_ids: list[str]) -> dict[str, set[str]]: ...
    def delete_chunks(self, chunk_ids: list[str]) -> None: ...
    def search(self, vector: np.ndarray, k: int, where: Mapping[str, Any] | None = None) -> list[Hit]: ...
    def count(self) -> int: ...
    def vectors(self) -> Iterator[tuple[str, np.ndarray]]: ...  # every (chunk_id, vector), streamed
    def optimize(self, min_writes: int = 0) -> None: ...
    def close(self) -> None: ...
    # documents of the collection (incremental processing)
    def doc_hashes(self, doc_ids: list[str]) -> dict[str, str]: ...
    def commit_documents(self, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int: ...
    def forget_documents(self, doc_ids: list[str]) -> int: ...
    def doc_ids(self) -> Iterator[str]: ...  # streamed, like documents(): memory bounded, not by the store
    def documents(self) -> Iterator[DocRecord]: ...
    # the collections of the store
    def collections(self) -> list[dict[str, Any]]: ...
    def active(self) -> str | None: ...
    def previous(self) -> str | None: ...  # the collection active before the last switch (for a rollback)
    def activate(self, name: str) -> None: ...  # the active one becomes the previous one
    def record_probe(self, result: dict[str, Any]) -> None: ...


def metadata_matches(metadata: Mapping[str, Any], where: Mapping[str, Any] | None) -> bool:
    """Search's filter: every `where` field is in the chunk's metadata with exactly that value."""
    return not where or all(k in metadata and metadata[k] == v for k, v in where.items())


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
