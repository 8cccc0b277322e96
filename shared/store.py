"""Opening a vector store (the embedded default, LanceDB on local disk, in shared/store_lance.py;
pgvector in shared/store_pg.py), and what works on any of them. The interface every backend offers
(Store, Hit, DocRecord) is in shared/store_types.py and importable from here.

A store holds collections, one per embedding spec (shared/spec.py); search reads the active one.
Writes are idempotent upserts by chunk_id, so a redelivered part never duplicates a row. Several
writer processes may write the same store at once (LanceDB commits optimistically and retries).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from shared.errors import ConfigError, PruneRefused
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store_types import DocRecord, Hit, Store, choose_collection, slices, stale_chunks

__all__ = [
    "OPTIMIZE_AFTER_DRAIN_WRITES",
    "DocRecord",
    "Hit",
    "KeptIds",
    "Store",
    "choose_collection",
    "delete_documents",
    "each_collection",
    "open_store",
    "prune",
    "slices",
    "stale_chunks",
]

# Writers compact (`optimize`) when a load has drained. A compaction rewrites every small fragment, so
# it costs about the table, not what changed: after a drained load (with a fast embedder, after almost
# every batch) it is worth it only once a few commits went in. At 10,000 SciFact abstracts, compacting at
# every drain made the writer spend 0.21 CPU ms per chunk against 0.10 without (bench/fast.py).
OPTIMIZE_AFTER_DRAIN_WRITES = 10
# A prune of at most this many documents of a collection is never refused, whatever share they are.
PRUNE_ALWAYS_ALLOWED = 10
# Which of these document IDs (a slice of a store's) the sources list now: a sync's listing held
# elsewhere (the distributed prune job asks Redis), so the store's side never holds it whole.
KeptIds = Callable[[list[str]], list[bool]]


def open_store(
    location: str,
    spec: EmbeddingSpec | None = None,
    collection: str | None = None,
    settings: Settings | None = None,
) -> Store:
    """A postgresql:// URL opens the pgvector store; a directory path the embedded LanceDB store.

    With `spec`, the handle writes and reads the collection of that spec (created on the first
    write; the first collection of a store becomes the active one). With `collection`, that one.
    With neither, the active collection: the one search uses. `settings` tune the indexes and
    search (ann_min_rows, search_nprobes, search_refine, ef_search, index_cache_mb); defaults without."""
    if location.startswith(("postgresql://", "postgres://")):
        from shared.store_pg import PgStore

        return PgStore(location, spec, collection, settings)
    if "://" in location:
        raise ConfigError(f"unsupported store {location!r}: use a directory path or a postgresql:// URL")
    from shared.store_lance import LanceStore

    return LanceStore(Path(location).expanduser(), spec, collection, settings)


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


def _membership(ids: Collection[str]) -> KeptIds:
    return lambda piece: [d in ids for d in piece]


def delete_documents(location: str, doc_ids: list[str]) -> dict[str, int]:
    """Remove documents and their chunks from every collection: {collection: documents removed}."""
    return {store.collection or "": store.forget_documents(doc_ids) for store in each_collection(location)}


def prune(
    location: str,
    kept: Collection[str] | KeptIds,
    *,
    listed: int | None = None,
    scope: str = "",
    max_fraction: float = 0.1,
    force: bool = False,
) -> dict[str, int]:
    """Sync: remove from every collection the documents under `scope` (an ID prefix; '' = all) that
    are not in `kept` (what the sources list now: the IDs, or a KeptIds that answers for `listed` of
    them): {collection: documents removed}. Guarded, because a listing of an unmounted or half-copied
    directory looks like a mass deletion: unless `force`, nothing is deleted if in any collection it
    would be more than `max_fraction` of its documents and more than PRUNE_ALWAYS_ALLOWED (PruneRefused,
    with the numbers). The store's IDs are streamed past `kept` a slice at a time (store_types.ID_SLICE),
    never held as a set; the gone ones are deleted in slices too."""
    if not callable(kept):
        listed = len(kept)
        kept = _membership(kept)
    if not listed and not force:
        raise PruneRefused("--prune with no documents listed would empty the store: refused")
    doomed: dict[str, list[str]] = {}
    for store in each_collection(location):
        total, gone = 0, []
        for piece in slices(store.doc_ids()):
            total += len(piece)
            gone += [d for d, is_kept in zip(piece, kept(piece), strict=True) if not is_kept and d.startswith(scope)]
        doomed[store.collection or ""] = gone
        if not force and len(gone) > PRUNE_ALWAYS_ALLOWED and len(gone) > max_fraction * total:
            raise PruneRefused(
                f"prune refused: it would delete {len(gone)} of the {total} documents of collection "
                f"{store.collection} ({len(gone) / total:.0%}), over EMBEDPIPE_PRUNE_MAX_FRACTION="
                f"{max_fraction:g}; check what was listed, narrow it with --prune-scope, or pass --force-prune"
            )
    removed = {}
    for store in each_collection(location):  # nothing deleted until every collection passed the guard
        gone = doomed.get(store.collection or "", [])
        removed[store.collection or ""] = store.forget_documents(gone)  # in slices
    return removed
