"""The LanceDB store at scale, on a real LanceDB: scalar and ANN indexes (built past a threshold, off
the write path in a child process, kept current), search over indexed and unindexed rows, streaming
readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shared.messages import Chunk
from shared.metrics import MAINTENANCE
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store import DocRecord, open_store

SPEC = EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25)
DIM = 32


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors around 50 shared centres: neighbours are close, as in real embeddings."""
    centres = np.random.default_rng(99).normal(size=(50, dim))
    rng = np.random.default_rng(seed)
    v = centres[rng.integers(0, 50, n)] + rng.normal(scale=0.5, size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def part(name: str, n: int, seed: int) -> tuple[list[Chunk], np.ndarray, list[DocRecord]]:
    chunks = [Chunk(f"{name}-{i}", f"{name}-d{i // 8}", i % 8, f"text {i}", 3, 0, 5, {}) for i in range(n)]
    docs = [DocRecord(f"{name}-d{j}", "h", 8, "doc", {}) for j in range((n + 7) // 8)]
    return chunks, clustered(n, seed), docs


def exact_top(store, query: np.ndarray, k: int) -> list[str]:
    ids, vectors = zip(*store.vectors(), strict=True)
    scores = np.stack(vectors) @ query
    return [ids[i] for i in np.argsort(-scores)[:k]]


@pytest.mark.slow  # the index is built in a child process (the store's maintenance)
def test_ann_index_is_built_past_the_threshold_used_and_kept_current(tmp_path):
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=2000))
    for p in range(3):  # 1,536 chunks: under the threshold, brute force only
        store.upsert(*part(f"p{p}", 512, p))
    store.wait_for_index()
    stats = store.index_stats()
    assert "vector_idx" not in stats
    # BTREE indexes on the lookup columns of both tables, from the first write
    assert {"chunk_id_idx", "doc_id_idx"} <= set(stats)
    assert {c for i in store._table("__docs").list_indices() for c in i.columns} == {"doc_id"}
    assert "ScalarIndexQuery" in store._table("").search().where("doc_id IN ('p0-d1')").explain_plan(True)

    store.upsert(*part("p3", 512, 3))  # past 2,000: the build starts beside the write
    store.wait_for_index()
    assert store.index_stats()["vector_idx"] == {"type": "IVF_SQ", "indexed": 2048, "unindexed": 0}
    plan = store.search_plan(clustered(1, 7)[0], 10)
    assert "ANNSubIndex: name=vector_idx" in plan

    store.upsert(*part("p4", 512, 4))  # a new fragment: searched by scan until indexed
    assert store.index_stats()["vector_idx"]["unindexed"] == 512
    assert "LanceScan" in store.search_plan(clustered(1, 7)[0], 10)  # the scan of the unindexed rows
    store.optimize()
    store.wait_for_index()
    stats = store.index_stats()
    assert stats["vector_idx"]["unindexed"] == 0 and stats["vector_idx"]["indexed"] == 2560
    assert stats["chunk_id_idx"]["unindexed"] == 0 and stats["doc_id_idx"]["unindexed"] == 0
    # grown 2x (ANN_RETRAIN_GROWTH) since the training: the index is trained again, over everything
    for p in range(5, 16):
        store.upsert(*part(f"p{p}", 512, p))
    store.wait_for_index()
    manifest = json.loads((tmp_path / "store.json").read_text())
    assert manifest["collections"][store.collection]["ann_rows"] >= 8192
    store.close()


@pytest.mark.slow  # the index is built in a child process (the store's maintenance)
def test_search_over_indexed_and_unindexed_rows_finds_the_planted_near_duplicates(tmp_path):
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=3000))
    query = clustered(2, 1234)
    near = query + np.random.default_rng(5).normal(scale=0.01, size=query.shape).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    for p in range(6):
        chunks, vectors, docs = part(f"p{p}", 512, p)
        if p == 2:  # one planted in what the index will hold
            vectors[100] = near[0]
        store.upsert(chunks, vectors, docs)
    store.wait_for_index()
    chunks, vectors, docs = part("late", 512, 77)
    vectors[3] = near[1]  # one planted in a fragment the index does not hold yet
    store.upsert(chunks, vectors, docs)
    stats = store.index_stats()["vector_idx"]
    assert stats["indexed"] == 3072 and stats["unindexed"] == 512

    for q, planted in ((query[0], "p2-100"), (query[1], "late-3")):
        exact = exact_top(store, q, 10)
        hits = [h.chunk_id for h in store.search(q, 10)]
        assert exact[0] == planted and hits[0] == planted
        assert len(set(hits) & set(exact)) >= 9  # recall@10 against exact search
    store.close()


@pytest.mark.slow  # the index is built in a child process (the store's maintenance)
def test_a_search_while_the_index_is_built_still_answers(tmp_path):
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=60_000))
    query = clustered(1, 4321)[0]
    for p in range(6):
        chunks = [Chunk(f"p{p}-{i}", f"p{p}-d{i // 8}", i % 8, "t", 1, 0, 1, {}) for i in range(10_000)]
        vectors = clustered(10_000, p)
        if p == 3:
            vectors[5] = query
        store.upsert(chunks, vectors)  # the last crosses 60,000: its build starts now
    answered_during_build, written = 0, 0
    while store._maint is not None and store._maint.is_alive():
        assert store.search(query, 5)[0].chunk_id == "p3-5"
        answered_during_build += store._maint.is_alive()
        if not written:  # writes and compaction go on beside the build; a lost commit race fails neither
            store.upsert(*part("during", 512, 9))
            store.optimize()
            written = 512
    assert answered_during_build > 0
    assert store.count() == 60_000 + written
    assert store.index_stats()["vector_idx"]["indexed"] >= 60_000
    assert store.search(query, 5)[0].chunk_id == "p3-5"
    store.close()


@pytest.mark.slow  # the index is built in a child process (the store's maintenance)
def test_a_failed_index_build_is_counted_never_fails_the_write_and_is_retried(tmp_path):
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=100))
    failed = MAINTENANCE.labels("failed")._value.get()
    chunks = [Chunk(f"z{i}", f"z{i}", 0, "t", 1, 0, 1, {}) for i in range(300)]
    store.upsert(chunks, np.zeros((300, DIM), np.float32))  # nothing a cosine k-means can train on
    store.wait_for_index()
    assert MAINTENANCE.labels("failed")._value.get() == failed + 1
    assert store.count() == 300 and "vector_idx" not in store.index_stats()
    store.upsert(*part("p", 512, 1))  # within the retry wait: no new try
    store.wait_for_index()
    assert MAINTENANCE.labels("failed")._value.get() == failed + 1
    store._retry_at = 0.0  # the wait (ANN_RETRY_S) is over
    store.upsert(*part("q", 512, 2))
    store.wait_for_index()
    assert store.index_stats()["vector_idx"]["indexed"] == 1324
    store.close()


def test_prune_streams_the_store_and_removes_in_slices(tmp_path, monkeypatch):
    from shared import store as store_module
    from shared import store_types

    monkeypatch.setattr(store_types, "ID_SLICE", 7)
    store = open_store(str(tmp_path), SPEC)
    chunks, vectors, docs = part("p", 400, 1)  # 50 documents
    store.upsert(chunks, vectors, docs)
    kept = {f"p-d{j}" for j in range(0, 50, 3)}
    assert store_module.prune(str(tmp_path), kept, force=True) == {store.collection: 50 - len(kept)}
    assert set(store.doc_ids()) == kept and store.count() == 8 * len(kept)
    assert {c["name"]: c["documents"] for c in store.collections()} == {store.collection: len(kept)}


# The readers of a whole table hold one batch, not the table: peak RSS growth while each iterator
# is drained, in a fresh process, on a store of 200,000 chunks and documents with long IDs (main's
# readers materialised them: hundreds of MB).
BUILD = textwrap.dedent("""
    import sys, numpy as np
    from shared.messages import Chunk
    from shared.settings import Settings
    from shared.spec import EmbeddingSpec
    from shared.store import DocRecord, open_store
    store = open_store(sys.argv[1], EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25),
                       settings=Settings(ann_min_rows=0))
    rng = np.random.default_rng(0)
    pad = "x" * 200
    for p in range(10):
        ids = [f"{pad}/doc-{p}-{i}" for i in range(20_000)]
        chunks = [Chunk(d + "#0", d, 0, "chunk text " * 20, 40, 0, 200, {}) for d in ids]
        docs = [DocRecord(d, "0" * 40, 1, "document text " * 40, {"n": i}) for i, d in enumerate(ids)]
        store.upsert(chunks, rng.normal(size=(20_000, 64)).astype(np.float32), docs)
    store.optimize()
    store.close()  # waits for the compaction
""")
DRAIN = textwrap.dedent("""
    import sys
    from shared.store import open_store
    def status_mb(field):
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024
    store = open_store(sys.argv[1])
    store.count(), store.doc_hashes(["x"]), store.chunk_ids(["x"])  # libraries and caches warmed up
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    before = status_mb("VmRSS")  # (ru_maxrss would count the forking parent's RSS too)
    n = sum(1 for _ in getattr(store, sys.argv[2])())
    print(n, before, status_mb("VmHWM"))
""")


@pytest.mark.slow
def test_the_readers_of_whole_tables_stream_in_bounded_memory(tmp_path):
    path = str(tmp_path / "store")
    subprocess.run([sys.executable, "-c", BUILD, path], check=True, timeout=900)
    for reader in ("doc_ids", "documents", "vectors"):
        out = subprocess.run(
            [sys.executable, "-c", DRAIN, path, reader], check=True, timeout=600, capture_output=True, text=True
        )
        n, before, peak = out.stdout.split()
        assert int(n) == 200_000
        assert float(peak) - float(before) < 80, (reader, before, peak)  # main: 180 to 840 MB


@pytest.mark.slow  # the index is built in a child process (the store's maintenance)
def test_new_rows_join_the_ann_index_as_deltas_merged_past_a_bound(tmp_path, monkeypatch):
    """A maintenance adds the new rows to the ANN index as a delta of their own, never rewriting the
    trained index; past MAX_DELTAS the deltas (not the base) are merged into one. The index is
    trained with ANN_PARTITION_ROWS rows per partition. Search sees the rows of every delta."""
    import lance

    from shared.lance_maintenance import ANN_PARTITION_ROWS, MAX_DELTAS

    monkeypatch.setenv("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=10_000))
    for p in range(20):  # 10,240 chunks: the index is trained over them (and not again before 20,480)
        store.upsert(*part(f"p{p}", 512, p))
    store.wait_for_index()
    dataset = str(tmp_path / f"{store.collection}.lance")

    def segments() -> list[dict]:
        return lance.dataset(dataset).stats.index_stats("vector_idx")["indices"]

    (base,) = segments()
    assert base["num_partitions"] == 10_240 // ANN_PARTITION_ROWS
    query = clustered(1, 4321)[0]
    counts = []
    for p in range(20, 21 + MAX_DELTAS):
        chunks, vectors, docs = part(f"p{p}", 512, p)
        if p == 22:
            vectors[7] = query  # planted in a delta that the merge folds in later
        store.upsert(chunks, vectors, docs)
        store.optimize()
        store.wait_for_index()
        counts.append(len(segments()))
        assert store.index_stats()["vector_idx"]["unindexed"] == 0
        if p >= 22:
            assert store.search(query, 5)[0].chunk_id == "p22-7"
    # one more segment per round up to the bound, then the deltas merged into one beside the base
    assert counts == [*range(2, MAX_DELTAS + 2), 2]
    assert store.index_stats()["vector_idx"]["indexed"] == 512 * (21 + MAX_DELTAS)
    store.close()


def test_a_maintenance_compacts_new_fragments_only_and_adds_btree_deltas_merged_past_a_bound(tmp_path, monkeypatch):
    """Compaction leaves the fragments an index covers alone (compacting one makes Lance rewrite every
    index over it) until more than MAX_SMALL_INDEXED are small, or one has deletions to drop; the
    BTREEs take the new rows as deltas, merged into one past MAX_DELTAS. Lookups and the merge of an
    upsert see the rows of every delta."""
    import lance

    from shared import lance_maintenance
    from shared.lance_maintenance import MAX_DELTAS, compact

    monkeypatch.setattr(lance_maintenance, "MAX_SMALL_INDEXED", MAX_DELTAS + 2)
    store = open_store(str(tmp_path), SPEC, settings=Settings(ann_min_rows=0))
    table = str(tmp_path / f"{store.collection}.lance")

    def fragments() -> list[int]:
        return [f.fragment_id for f in lance.dataset(table).get_fragments()]

    def btree_segments() -> int:
        return sum(i["name"] == "chunk_id_idx" for i in lance.dataset(table).list_indices())

    store.upsert(*part("r0", 64, 0))
    store.wait_for_index()  # the handle's own maintenance never runs below: OPTIMIZE_EVERY_WRITES
    segments = []
    for r in range(1, MAX_DELTAS + 3):
        settled = fragments()  # all indexed: the last round indexed what it compacted
        for w in range(3):
            store.upsert(*part(f"r{r}w{w}", 64, 10 * r + w))
        compact(table, store.collection)
        after = fragments()
        assert after[: len(settled)] == settled and len(after) == len(settled) + 1  # the 3 new ones into 1
        segments.append(btree_segments())
        assert store.index_stats()["chunk_id_idx"]["unindexed"] == 0
        assert store.chunk_ids(["r1w0-d2"]) == {"r1w0-d2": {f"r1w0-{i}" for i in range(16, 24)}}
    assert segments == [*range(2, MAX_DELTAS + 2), 1, 2]  # a delta a round; past the bound all merged
    rows = store.count()
    chunks, vectors, docs = part("r1w0", 64, 10)  # again: the merge finds them through the BTREE
    store.upsert([c.__class__(**{**c.__dict__, "text": "edited"}) for c in chunks], vectors, docs)
    assert store.count() == rows

    monkeypatch.setattr(lance_maintenance, "MAX_SMALL_INDEXED", 3)  # past it: the small ones merged too
    compact(table, store.collection)
    assert len(fragments()) < 4
    held = len(fragments())
    gone = [f"r{r}w{w}-d{j}" for r in (1, 2) for w in range(3) for j in range(8)]  # 384 of 1,984 rows
    store.forget_documents(gone)
    assert sum(f.metadata.num_deletions for f in lance.dataset(table).get_fragments()) > 198  # > 10%
    compact(table, store.collection)  # deletions to drop (past MAX_DELETED): rewritten
    dataset = lance.dataset(table)
    assert all(f.metadata.num_deletions == 0 for f in dataset.get_fragments()) and len(fragments()) <= held
    assert dataset.count_rows() == rows - 384 == store.count()
    assert store.chunk_ids(["r3w0-d0"]) == {"r3w0-d0": {f"r3w0-{i}" for i in range(8)}}
    store.close()


# The allocator a process opening a LanceDB store ends up with, in a fresh process each time.
POOL = textwrap.dedent("""
    import sys
    import pyarrow as pa
    from shared.settings import Settings
    from shared.spec import EmbeddingSpec
    from shared.store import open_store
    open_store(sys.argv[1], EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25), settings=Settings.from_env())
    print(pa.default_memory_pool().backend_name)
""")


@pytest.mark.slow
@pytest.mark.parametrize(("arenas", "pool"), [("2", "system"), ("0", "mimalloc")])
def test_a_process_opening_a_lance_store_gives_pyarrow_glibcs_bounded_malloc(tmp_path, arenas, pool):
    """pyarrow's allocations (the rows every upsert builds) go through glibc's malloc, bounded as LanceDB's
    are: its default pool, mimalloc, kept what it freed and grew the write worker with its work
    (bench/README.md, scale.py); EMBEDPIPE_MALLOC_ARENAS=0 leaves both allocators at their defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDPIPE_", "ARROW_"))}
    env["EMBEDPIPE_MALLOC_ARENAS"] = arenas
    out = subprocess.run(
        [sys.executable, "-c", POOL, str(tmp_path / "store")], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == pool
