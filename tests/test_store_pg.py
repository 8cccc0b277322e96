"""The pgvector store against a real PostgreSQL with pgvector."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.messages import Chunk
from shared.store import open_store

pytestmark = pytest.mark.slow


def chunks(doc: str, n: int, dim: int = 8, seed: int = 0) -> tuple[list[Chunk], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Chunk(f"{doc}-{i}", doc, i, f"text {i} of {doc}", 3, 0, 5, {"k": i}) for i in range(n)], vectors


def test_upserts_are_idempotent_and_search_ranks_by_cosine(pg_url):
    store = open_store(pg_url, "all-MiniLM-L6-v2")
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
    assert store.has_index()
    assert store.search(va[3], 1)[0].chunk_id == "a-3"
    assert store.chunk_ids(["a", "missing"]) == {"a": {f"a-{i}" for i in range(20)}, "missing": set()}
    store.delete_chunks(["a-0", "a-1"])
    assert store.count() == 18
    np.testing.assert_allclose(store.vectors()["a-5"], va[5], atol=1e-6)
    store.close()


def test_one_table_holds_one_model(pg_url):
    store = open_store(pg_url, "model-a")
    store.upsert(*chunks("a", 2))
    store.close()
    with pytest.raises(ConfigError, match="model-a"):
        open_store(pg_url, "model-b")


WRITER = """
import sys, numpy as np
from shared.messages import Chunk
from shared.store import open_store
store = open_store(sys.argv[1], "m")
rng = np.random.default_rng(int(sys.argv[2]))
for round in range(15):
    ids = rng.permutation(60)[:40]  # overlapping keys, in a different order in every batch
    batch = [Chunk(f"c{i}", f"d{i % 6}", int(i), "t", 1, 0, 1, {}) for i in ids]
    store.upsert(batch, rng.normal(size=(len(batch), 8)).astype(np.float32))
store.close()
"""


def test_concurrent_writers_neither_deadlock_nor_lose_rows(pg_url):
    seed_store = open_store(pg_url, "m")
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
    store = open_store(pg_url, "m")
    assert store.count() == len(written) + 1
    assert set().union(*store.chunk_ids([f"d{i}" for i in range(6)]).values()) == written
    store.close()
