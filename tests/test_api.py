"""The Python API (issue 17, item 3): the README's example runs as written, `submit` hands back batch IDs
to wait on, and search's metadata filter on both stores."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redis import Redis

import embedpipe
from shared.messages import Chunk
from shared.spec import EmbeddingSpec
from shared.store import open_store

from .helpers import EXAMPLES, REPO, cli_env, worker_pool

pytestmark = pytest.mark.slow


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(EXAMPLES)  # run from a checkout: the paths it names are relative
    result = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.match(r"9 documents stored, 0 failed, \d+ chunks\n", result.stdout), result.stdout
    assert "faq-001" in result.stdout.splitlines()[1]  # the coffee record answers the coffee question first
    assert (tmp_path / "api-store").is_dir()


def test_submit_returns_batches_to_wait_on(tmp_path: Path, redis_url: str) -> None:
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"), EMBEDPIPE_BATCH_DOCS="4")
    settings = embedpipe.Settings.from_env(env)
    handle = embedpipe.submit(
        [
            EXAMPLES / "records.jsonl",
            {"id": "note", "text": "Kites fly best in a steady breeze.", "metadata": {"t": 1}},
        ],
        settings=settings,
    )
    assert handle.documents == 9 and len(handle.batch_ids) == 3 and not handle.rejected
    assert handle.wait(timeout=0.5) is False  # no workers yet
    with worker_pool(
        env, tmp_path / "logs", Redis.from_url(redis_url), workers={s: 1 for s in ("load", "chunk", "embed", "write")}
    ):
        assert handle.wait(timeout=300) is True
    hits = embedpipe.search("kites and wind", k=1, where={"t": 1}, settings=settings)
    assert [h.doc_id for h in hits] == ["note"]


@pytest.fixture(params=["lancedb", "pgvector"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "lancedb" else request.getfixturevalue("pg_url")


def test_search_filters_on_metadata(store_location: str) -> None:
    spec = EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25)
    store = open_store(store_location, spec)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    topics = ["tea", "coffee", 'say "it\'s 50%_\\done"']
    chunks = [
        Chunk(f"d{i}-0", f"d{i}", 0, f"text {i}", 3, 0, 5, {"topic": topics[i % 3], "n": i % 2}) for i in range(30)
    ]
    store.upsert(chunks, vectors)
    query = vectors[0]  # a tea chunk's own vector
    assert {h.metadata["topic"] for h in store.search(query, 10)} == set(topics)  # unfiltered: all kinds
    for where in ({"topic": "coffee"}, {"topic": topics[2]}, {"topic": "tea", "n": 1}):
        hits = store.search(query, 4, where)
        expected = [c for c in chunks if all(c.metadata[k] == v for k, v in where.items())]
        best = sorted(expected, key=lambda c: -float(vectors[chunks.index(c)] @ query))[:4]
        assert [h.chunk_id for h in hits] == [c.chunk_id for c in best], where
    assert store.search(query, 4, {"topic": "cocoa"}) == []
    assert store.search(query, 4, {"missing": "tea"}) == []
    store.close()
