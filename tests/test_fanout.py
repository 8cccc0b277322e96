"""Several models at once (EMBEDPIPE_MODELS): each document is loaded once, chunked once per chunk policy and
embedded by each model into its own collection, from its own embed queue; a document is done only when
every model has it, and a dead letter names the model that failed it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, Worker

from shared.errors import ConfigError
from shared.lanes import lanes, own_lane, share_id
from shared.messages import Document, content_hash
from shared.queues import embed_pool, pools, queue
from shared.settings import Settings
from shared.spec import chunk_policy, spec_for
from shared.store import open_store
from shared.tokenizers import load_tokenizer
from workers.chunk import plan_batch

from .helpers import REPO, WORDS, cli_env, embedpipe, short_documents, wait_until, worker_pool
from .servers import free_port

API = "openai:text-embedding-3-small@256"
LOCAL = "all-MiniLM-L6-v2"


def test_models_make_lanes_with_their_own_embed_queues_and_an_embed_worker_serves_the_one_it_names():
    one = Settings()
    assert [(lane.name, lane.settings.model) for lane in lanes(one)] == [("", LOCAL)]
    assert pools(one) == ["load", "chunk", "embed", "write"] and share_id("b1", "") == "b1"

    two = Settings.from_env({"EMBEDPIPE_MODELS": f"{LOCAL}, {LOCAL}@128"})
    assert (two.model, two.dimensions) == (LOCAL, 0)  # the first model is the primary (search, probes)
    named = [(lane.name, lane.settings.model, lane.settings.dimensions) for lane in lanes(two)]
    assert named == [("all-minilm-l6-v2", LOCAL, 0), ("all-minilm-l6-v2-128", LOCAL, 128)]
    assert pools(two) == ["load", "chunk", "embed@all-minilm-l6-v2", "embed@all-minilm-l6-v2-128", "write"]
    assert queue(Redis(), embed_pool("x"), "staging").name == "staging:embed@x"
    assert own_lane(two).name == "all-minilm-l6-v2"
    assert (
        own_lane(Settings.from_env({"EMBEDPIPE_MODELS": two.models}, model=f"{LOCAL}@128")).settings.dimensions == 128
    )
    with pytest.raises(ConfigError, match="must name one model of EMBEDPIPE_MODELS"):
        own_lane(Settings.from_env({"EMBEDPIPE_MODELS": two.models}, model="other-model"))
    with pytest.raises(ConfigError, match="same lane name"):
        lanes(Settings(models="a-b,a_b"))


def test_lanes_with_one_tokenizer_and_chunk_policy_cut_each_document_once(tmp_path):
    settings = Settings(store=str(tmp_path / "store"))
    tokenizer = load_tokenizer(LOCAL)
    policy = chunk_policy(settings, tokenizer)
    docs = [Document(f"d{i}", " ".join(WORDS * 30), content_hash(" ".join(WORDS * 30), {}), {}) for i in range(3)]
    stores = [open_store(settings.store, spec_for(s)) for s in (settings, Settings(dimensions=128))]
    memo: dict = {}
    a, b = (plan_batch(docs, store, tokenizer, policy, settings, "spec", memo) for store in stores)
    alone = plan_batch(docs, stores[0], tokenizer, policy, settings, "spec")
    assert len(a.chunks) > 3 and [c.chunk_id for c in a.chunks] == [c.chunk_id for c in alone.chunks]
    assert all(x is y for x, y in zip(a.chunks, b.chunks, strict=True))  # one cut, two lanes
    assert not any(x is y for x, y in zip(a.chunks, alone.chunks, strict=True))


def _start_openai(log: Path) -> tuple[subprocess.Popen, str]:
    """tests/openai_server.py in its own process; inputs over 40 tokens get OpenAI's 400."""
    port = free_port()
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.openai_server", "--port", str(port), "--max-input-tokens", "40"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/log", timeout=5).read()
            return True
        except OSError:
            assert proc.poll() is None, log.read_text()
            return False

    wait_until(up, 60, "the OpenAI stand-in answers")
    return proc, f"http://127.0.0.1:{port}/v1"


@pytest.mark.slow
def test_two_models_fill_their_own_collections_and_a_document_is_done_when_both_have_it(tmp_path, redis_url):
    """The API model's pool runs alone first: it stores the short documents and refuses the two long ones
    (dead letters naming it); nothing is done yet, since the local model's pool is down. When that pool
    comes up, its collection fills with every document, and only the documents both models hold are done:
    the local model's success does not clear the API model's dead letters."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = {f"ok-{i}.txt": f"Short note number {i} about tea." for i in range(4)}
    docs |= {f"long-{i}.txt": " ".join(WORDS * (4 + i)) for i in range(2)}
    for name, text in docs.items():
        (corpus / name).write_text(text)
    short, long = {d for d in docs if d.startswith("ok-")}, {d for d in docs if d.startswith("long-")}
    proc, url = _start_openai(tmp_path / "openai.log")
    store = str(tmp_path / "store")
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=store,
        EMBEDPIPE_MODELS=f"{LOCAL},{API}",
        EMBEDPIPE_OPENAI_BASE_URL=url,
        EMBEDPIPE_OPENAI_API_KEY="k",
        EMBEDPIPE_CHUNK_TOKENS="200",
        EMBEDPIPE_BATCH_DOCS="4",
        EMBEDPIPE_INBOX_WAIT_S="0.2",
    )
    settings = Settings.from_env(env)
    local, api = lanes(settings)
    redis = Redis.from_url(redis_url)
    collections = {lane.name: open_store(store, spec_for(lane.settings)) for lane in (local, api)}

    def status() -> dict:
        return json.loads(embedpipe("status", "--json", env=env).stdout)

    def letters() -> list[dict]:
        return json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]

    workers = {"load": 1, "chunk": 1, f"embed@{api.name}": 1, f"embed@{local.name}": 1, "write": 1}
    try:
        with worker_pool(env, tmp_path / "logs", redis, workers=workers, start=False) as pool:
            for name in pool.commands:
                if not name.startswith(f"embed@{local.name}-"):
                    pool.start(name)
            api_queue = queue(redis, embed_pool(api.name), "")
            wait_until(
                lambda: Worker.count(queue=api_queue) and Worker.count(queue=queue(redis, "write", "")),
                240,
                "workers up",
            )
            embedpipe("enqueue", str(corpus), env=env)

            wait_until(
                lambda: set(collections[api.name].doc_ids()) == short and len(letters()) == 2, 240, "API lane done"
            )
            time.sleep(1)  # room for a wrong early count to show
            early = status()
            assert early["documents_done"] == 0, "done before the local model has a single document"
            assert early["models"][API]["documents_done"] == 4 and early["models"][LOCAL] == {
                "pool": f"embed@{local.name}"
            }
            assert (
                early["stages"][f"embed@{local.name}"]["queued"] > 0
                and early["stages"][f"embed@{local.name}"]["workers"] == 0
            )
            assert list(collections[local.name].doc_ids()) == []
            table = embedpipe("status", env=env).stdout
            assert f"embed@{local.name}" in table and f"embed@{api.name}" in table

            pool.start(f"embed@{local.name}-0")
            embedpipe("wait", "--timeout", "300", env=env, timeout=360)
            final, dead = status(), letters()
            lines = embedpipe("failed", env=env).stdout
        pool.assert_clean_exit()
    finally:
        proc.terminate()
        proc.wait(30)

    assert set(collections[local.name].doc_ids()) == set(docs)
    assert set(collections[api.name].doc_ids()) == short
    for lane, dims in ((local, 384), (api, 256)):  # each model's own vectors
        assert {v.shape for _, v in collections[lane.name].vectors()} == {(dims,)}, lane.name
    assert {d["doc_id"] for d in dead} == long
    assert all(d["spec"] == api.name and d["stage"] == "embed" and d["reason"] == "model_error" for d in dead)
    assert f"[embed@{api.name}/model_error]" in lines
    assert final["documents_done"] == 4 and final["documents_failed"] == 2
    assert final["models"][LOCAL]["documents_done"] == 6 and final["models"][API]["documents_done"] == 4
    assert final["chunks_written"] == collections[local.name].count() + collections[api.name].count()
    assert {q.name for q in Queue.all(connection=redis)} >= {f"embed@{local.name}", f"embed@{api.name}"}


@pytest.mark.slow
def test_a_distributed_migration_writes_both_collections_and_a_stale_backfill_copy_never_wins(tmp_path, redis_url):
    """A migration with EMBEDPIPE_MODELS=ACTIVE,NEW: `reembed --enqueue` backfills the new collection while
    new and changed documents reach both (dual write). A document edited after the backfill read it (here
    by an embedded `run`, before the pools take the backfill) keeps its newer text in the active collection:
    the backfill's stale copy is dropped, in every lane, and a second backfill brings the new collection
    up to date; then promote, roll back, promote again."""
    store = str(tmp_path / "store")
    docs = short_documents(12)

    def write(name: str, rows: list[dict]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    alone = cli_env(EMBEDPIPE_STORE=store)
    embedpipe("run", write("v1.jsonl", docs), env=alone)
    active = open_store(store).collection
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=store,
        EMBEDPIPE_MODELS=f"{LOCAL},{LOCAL}@128",
        EMBEDPIPE_BATCH_DOCS="4",
        EMBEDPIPE_INBOX_WAIT_S="0.2",
    )
    backfill = ["reembed", "--enqueue", "--model", LOCAL, "--dimensions", "128"]
    embedpipe(*backfill, env=env)  # reads every text now; the pools are not up yet
    edited = dict(docs[0], text="A new text about sea breezes and kites, written after the backfill read it.")
    embedpipe("run", write("edit.jsonl", [edited]), env=alone)  # the active collection moves on

    def texts(collection: str) -> dict[str, str]:
        return {r.doc_id: r.text for r in open_store(store, collection=collection).documents()}

    def states() -> dict[str, str]:
        rows = json.loads(embedpipe("collections", "--json", env=env).stdout)["collections"]
        return {c["name"]: c["state"] for c in rows}

    redis = Redis.from_url(redis_url)
    lane_names = [lane.name for lane in lanes(Settings.from_env(env))]
    workers = {"load": 1, "chunk": 1, **{f"embed@{n}": 1 for n in lane_names}, "write": 1}
    with worker_pool(env, tmp_path / "logs", redis, workers=workers):
        embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        [new] = [name for name in states() if name != active]
        first = texts(active), texts(new)
        # dual write: an edit submitted now reaches both collections
        changed = dict(docs[1], text="Both collections get this edit of the second note, about bees and maps.")
        embedpipe("enqueue", write("dual.jsonl", [changed]), env=env)
        embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        second = texts(active), texts(new)
        embedpipe(*backfill, env=env)  # the catch-up: only what the new collection lacks
        embedpipe("wait", "--timeout", "300", env=env, timeout=360)
        third = texts(new)
        assert not json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]

    ids = {d["id"] for d in docs}
    assert first[0][edited["id"]] == edited["text"], "the backfill's stale copy overwrote the newer text"
    assert set(first[1]) == ids - {edited["id"]}  # the stale copy went nowhere
    assert second[0][changed["id"]] == second[1][changed["id"]] == changed["text"]
    assert third == texts(active) and third[edited["id"]] == edited["text"]
    assert states() == {active: "active", new: "complete"}
    embedpipe("promote", new, "--force", env=env)  # (no quality probe here: --force)
    embedpipe("promote", "--rollback", env=env)
    assert states() == {active: "active", new: "previous"}
    embedpipe("promote", new, "--force", env=env)
    assert states() == {active: "previous", new: "active"}
