"""The stores cut every list of IDs they are given into slices of store_types.ID_SLICE, so that no caller
builds an unbounded `IN (...)` filter or array (a migration hands them every document of a collection):
lookups and deletes over more IDs than a slice come back complete and right, on a real LanceDB and a real
pgvector; and the migration's progress and backfill, which read and delete across whole collections."""

from __future__ import annotations

import math

import numpy as np
import pytest

from producer.lifecycle import backfill, progress
from shared import store_types
from shared.messages import Chunk, SourceDoc
from shared.metrics import STORE_WRITES
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store import DocRecord, open_store
from workers.embedded import run_embedded

from .helpers import short_documents

SLICE = 7
DOCS = 40  # more than five slices


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_types, "ID_SLICE", SLICE)


def spec(model: str) -> EmbeddingSpec:
    return EmbeddingSpec(model, "rev", "mean", True, 256, 0, "", 254, 25)


def write(store, ids: list[str], content_hash: str = "h", per_doc: int = 3, dim: int = 8) -> None:
    """Documents complete, `per_doc` chunks each, in one upsert."""
    chunks = [Chunk(f"{d}-{i}", d, i, f"text {i} of {d}", 3, 0, 5, {}) for d in ids for i in range(per_doc)]
    vectors = np.random.default_rng(len(ids)).normal(size=(len(chunks), dim)).astype(np.float32)
    store.upsert(chunks, vectors, [DocRecord(d, content_hash, per_doc, f"text of {d}", {}) for d in ids])


def lookups_and_deletes_in_slices(location: str) -> None:
    store = open_store(location, spec("a"))
    ids = [f"d{i:02d}" for i in range(DOCS)]
    write(store, ids)
    asked = [*ids, "missing-1", "missing-2"]
    assert store.doc_hashes(asked) == dict.fromkeys(ids, "h")
    assert store.chunk_ids(asked) == {d: {f"{d}-{i}" for i in range(3)} for d in ids} | {
        "missing-1": set(),
        "missing-2": set(),
    }

    store.delete_chunks([f"{d}-0" for d in ids[::2]])  # 20 chunks: three slices
    assert store.count() == 3 * DOCS - DOCS // 2
    assert store.chunk_ids(["d00", "d01"]) == {"d00": {"d00-1", "d00-2"}, "d01": {"d01-0", "d01-1", "d01-2"}}

    gone = [*ids[::3], "missing-1"]  # 14 held, one not: three slices
    deletes = STORE_WRITES.labels("delete")._value.get()
    assert store.forget_documents(gone) == len(ids[::3])
    assert STORE_WRITES.labels("delete")._value.get() - deletes == math.ceil(len(gone) / SLICE)
    kept = [d for d in ids if d not in gone]
    assert sorted(store.doc_ids()) == kept
    assert store.count() == sum(2 if int(d[1:]) % 2 == 0 else 3 for d in kept)
    assert not any(store.chunk_ids(gone).values()) and store.doc_hashes(gone) == {}
    store.close()


def progress_over_slices(location: str) -> None:
    """The active collection holds DOCS documents; the other one 30 of them as they are, 5 with another
    text and 4 the active one does not hold."""
    active = open_store(location, spec("a"))
    ids = [f"d{i:02d}" for i in range(DOCS)]
    write(active, ids)
    other = open_store(location, spec("b"))
    write(other, ids[:30])
    write(other, ids[30:35], content_hash="older")
    write(other, [f"extra-{i}" for i in range(4)])
    assert active.active() == active.collection
    assert progress(location) == {other.collection: {"done": 30, "total": DOCS, "extra": 4}}
    active.close()
    other.close()


def test_lance_lookups_and_deletes_go_in_slices(tmp_path):
    lookups_and_deletes_in_slices(str(tmp_path))


def test_lance_progress_reads_the_collections_in_slices(tmp_path):
    progress_over_slices(str(tmp_path))


@pytest.mark.slow
def test_pgvector_lookups_and_deletes_go_in_slices(pg_url):
    lookups_and_deletes_in_slices(pg_url)


@pytest.mark.slow
def test_pgvector_progress_reads_the_collections_in_slices(pg_url):
    progress_over_slices(pg_url)


@pytest.mark.slow
def test_a_backfill_removes_what_the_source_no_longer_holds_in_slices(tmp_path, embedder):
    location = str(tmp_path / "store")
    old = Settings.from_env({}, store=location, batch_docs=8)
    new = Settings.from_env({}, store=location, batch_docs=8, dimensions=64)
    run_embedded(old, [SourceDoc(d["id"], text=d["text"]) for d in short_documents(DOCS)], embedder=embedder)
    source = open_store(location)
    target = open_store(location, collection=backfill(new, source.collection)[0].collection)
    planted = [f"planted-{i:02d}" for i in range(10)]  # in the target only: two slices
    write(target, planted, dim=64)
    source.forget_documents([f"doc-{i:05d}" for i in range(0, DOCS, 4)])  # ten, as a sync would
    assert progress(location)[target.collection]["extra"] == 20

    backfill(new, source.collection)
    ids = sorted(source.doc_ids())
    assert len(ids) == DOCS - 10 and sorted(target.doc_ids()) == ids
    assert target.doc_hashes(ids) == source.doc_hashes(ids)
    assert progress(location) == {target.collection: {"done": DOCS - 10, "total": DOCS - 10, "extra": 0}}
    source.close()
    target.close()
