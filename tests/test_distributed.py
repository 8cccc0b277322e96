"""The distributed pipeline end to end: a real Redis, real worker processes of all four pools, the
CLI and a raw inbox push as clients; then the store, the dead letters and the embedded mode agree."""

from __future__ import annotations

import json
import os
import shutil
import time

import msgpack
import numpy as np
import pytest
from redis import Redis

from producer.sources import iter_sources, resolve
from shared.messages import SourceDoc
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.store import open_store
from workers.chunk import chunk_batch
from workers.embedded import run_embedded
from workers.load import load_batch

from .helpers import EXAMPLES, cli_env, embedpipe, worker_pool

pytestmark = pytest.mark.slow

BAD = {  # file name -> expected dead-letter reason
    "empty.txt": "empty",
    "blob.bin": "unsupported_type",
    "broken.pdf": "decode_error",
}


@pytest.fixture
def corpus(tmp_path):
    """A few real documents of the sample corpus in several formats, plus bad ones."""
    root = tmp_path / "corpus"
    for sub in ("docs", "web", "pdf"):
        (root / sub).mkdir(parents=True)
    for name in (
        "docs/redis-basics.md",
        "docs/bicycle-flat-tyre.md",
        "docs/photosynthesis.txt",
        "web/tls-certificates.html",
        "pdf/houseplant-repotting.pdf",
    ):
        shutil.copy(EXAMPLES / name, root / name)
    (root / "records.jsonl").write_text(
        '{"id": "faq-tea", "text": "Green tea is best steeped at 80 degrees."}\n{oops\n'
    )
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (root / "broken.pdf").write_bytes(b"%PDF-1.7\n this file was cut short")
    return root


@pytest.fixture(params=["lancedb", "pgvector"])
def store_location(request, tmp_path) -> str:
    """The embedded default (a LanceDB directory) and the server store (PostgreSQL with pgvector)."""
    return request.getfixturevalue("pg_url") if request.param == "pgvector" else str(tmp_path / "store")


@pytest.fixture
def pool(redis_url, tmp_path, store_location):
    """janitor + one long-running worker per stage, as separate processes; stopped with SIGTERM."""
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=store_location,
        EMBEDPIPE_INBOX_WAIT_S="0.2",
        EMBEDPIPE_LOG_LEVEL="INFO",
        EMBEDPIPE_ANN_MIN_ROWS="1",  # the ANN index past a tiny threshold: built once the load drained
    )
    redis = Redis.from_url(redis_url)
    with worker_pool(env, tmp_path / "logs", redis) as workers:
        # The embedder gets the CPU first: every other process lowers its priority (EMBEDPIPE_SUPPORT_NICE).
        base = os.getpriority(os.PRIO_PROCESS, 0)
        nice = {name: os.getpriority(os.PRIO_PROCESS, p.pid) - base for name, p in workers.procs.items()}
        assert nice == {name: 0 if name.startswith("embed") else min(10, 19 - base) for name in nice}
        yield env, redis
    workers.assert_clean_exit()


def test_distributed_pipeline_stores_every_chunk_once_and_reports_bad_documents(
    corpus, pool, tmp_path, tokenizer, embedder
):
    env, redis = pool
    out = embedpipe("enqueue", str(corpus), env=env).stdout
    assert "enqueued 9 documents" in out and "1 rejected" in out
    redis.rpush(
        "embedpipe:inbox",
        json.dumps({"v": 1, "id": "inbox-json", "text": "Espresso is coffee brewed under nine bars of pressure."}),
        msgpack.packb(
            {
                "v": 1,
                "id": "inbox-msgpack",
                "text": "Compost needs greens, browns, air and water.",
                "metadata": {"via": "msgpack"},
            }
        ),
        b"\x00 not a message",
        json.dumps({"v": 99, "id": "from-the-future", "text": "x"}),
    )
    embedpipe("wait", "--timeout", "600", env=env, timeout=660)

    # Every good document is stored with exactly the chunks the chunker makes of it, once each.
    settings = Settings.from_env({})
    sources = [s for s in iter_sources(resolve([str(corpus)]), settings.max_doc_bytes) if isinstance(s, SourceDoc)]
    sources += [
        SourceDoc("inbox-json", text="Espresso is coffee brewed under nine bars of pressure."),
        SourceDoc("inbox-msgpack", text="Compost needs greens, browns, air and water."),
    ]
    docs, _ = load_batch([s.to_dict() for s in sources], settings.max_doc_bytes)
    policy = chunk_policy(Settings(), tokenizer)
    expected = {}
    for c in chunk_batch(docs, tokenizer, policy):
        expected.setdefault(c.doc_id, set()).add(c.chunk_id)
    store = open_store(env["EMBEDPIPE_STORE"])
    try:
        assert store.chunk_ids(list(expected)) == expected
        assert store.count() == sum(map(len, expected.values()))  # no duplicates, nothing else
        if hasattr(
            store, "has_index"
        ):  # pgvector: the index is built (in the writer's side thread) once the load drained
            deadline = time.monotonic() + 120
            while not store.has_index() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert store.has_index()
        hits = store.search(embedder.embed(["how do I repair a punctured inner tube"])[0], 3)
        assert hits[0].doc_id == "docs/bicycle-flat-tyre.md"

        failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
        reasons = {f["doc_id"]: (f["stage"], f["reason"]) for f in failed}
        assert reasons == {
            **{name: ("load", reason) for name, reason in BAD.items()},
            "records.jsonl:2": ("submit", "decode_error"),
            "from-the-future": ("inbox", "decode_error"),
            next(k for k in reasons if k.startswith("inbox:")): ("inbox", "decode_error"),
        }
        status = json.loads(embedpipe("status", "--json", env=env).stdout)
        assert status["documents_done"] == len(expected) == 8
        assert status["documents_failed"] == len(failed) == 6
        assert all(
            s["queued"] == s["running"] == s["failed"] == 0 and s["workers"] == 1 for s in status["stages"].values()
        )

        # The embedded mode makes the same chunks and the same vectors of the same files.
        embedded_store = tmp_path / "embedded"
        run_embedded(
            Settings.from_env({}, store=str(embedded_store)),
            iter_sources(resolve([str(corpus)]), settings.max_doc_bytes),
            embedder=embedder,
        )
        local = dict(open_store(str(embedded_store)).vectors())
        distributed = dict(store.vectors())
        assert set(local) == set(distributed) - expected["inbox-json"] - expected["inbox-msgpack"]
        for chunk, vector in local.items():
            np.testing.assert_allclose(vector, distributed[chunk], atol=1e-5)
    finally:
        store.close()


def test_burst_workers_and_janitor_exit_when_there_is_nothing_to_do(redis_url, tmp_path):
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_STORE=str(tmp_path / "store"))
    embedpipe("janitor", "--burst", env=env, timeout=60)
    embedpipe("worker", "load", "--burst", env=env, timeout=60)
    assert json.loads(embedpipe("status", "--json", env=env).stdout)["stages"]["load"]["workers"] == 0


def test_password_on_the_command_line_is_refused(redis_url):
    result = embedpipe("status", "--redis-url", "redis://:hunter2@127.0.0.1:1/0", env=cli_env(), check=False)
    assert result.returncode == 2 and "EMBEDPIPE_REDIS_PASSWORD" in result.stderr and "hunter2" not in result.stderr
    store = "postgresql://embedpipe:hunter2@127.0.0.1:1/embedpipe"
    for args in (["search", "tea", "--store", store], ["worker", "write", "--store", store, "--burst"]):
        result = embedpipe(*args, env=cli_env(), check=False)
        assert result.returncode == 2 and "PGPASSWORD" in result.stderr and "hunter2" not in result.stderr, args
