"""The prune guard: a sync that would delete more than EMBEDPIPE_PRUNE_MAX_FRACTION of a collection (and
more than 10 documents) is refused with the numbers unless forced, in the store function both runtimes
call, in `embedpipe run --prune`, and in the distributed prune job (a dead letter, not a deletion);
--prune-scope limits a prune to document IDs under a prefix. Real LanceDB stores and a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest
from redis import Redis

from producer import submit
from shared import keys, store_types
from shared.errors import DecodeError, PruneRefused
from shared.ledger import RedisLedger
from shared.messages import Chunk, PruneRequest
from shared.queues import queue
from shared.settings import STAGES, Settings
from shared.spec import EmbeddingSpec
from shared.store import DocRecord, open_store, prune
from workers.context import WorkerContext
from workers.write import prune_job

from .helpers import cli_env, embedpipe


def fill(location: str, ids: list[str], dimensions: int = 0) -> None:
    """One chunk per document (random 8-d vectors) in the collection of a spec with these dimensions."""
    store = open_store(location, EmbeddingSpec("m", "rev", "mean", True, 256, dimensions, "", 254, 25))
    chunks = [Chunk(f"{d}#0", d, 0, f"text of {d}", 3, 0, 10, {}) for d in ids]
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    store.upsert(chunks, vectors, [DocRecord(d, "h", 1, "", {}) for d in ids])
    store.close()


def stored(location: str) -> dict[str, set[str]]:
    names = [c["name"] for c in open_store(location).collections()]
    return {n: set(open_store(location, collection=n).doc_ids()) for n in names}


def test_the_guard_refuses_a_mass_prune_in_any_collection_and_force_overrides_it(tmp_path):
    location = str(tmp_path / "store")
    ids = [f"doc-{i:03d}" for i in range(40)]
    fill(location, ids)
    fill(location, ids, dimensions=4)  # a second collection: the guard looks at each
    before = stored(location)

    with pytest.raises(PruneRefused, match=r"delete 20 of the 40 documents .*\(50%\).*--force-prune"):
        prune(location, set(ids[:20]), max_fraction=0.1)
    assert stored(location) == before, "a refused prune deleted something"

    assert prune(location, set(ids[:20]), max_fraction=0.5) == dict.fromkeys(before, 20)  # the share is a setting
    assert prune(location, set(ids[:12]), max_fraction=0.1) == dict.fromkeys(before, 8)  # 10 or fewer: allowed
    with pytest.raises(PruneRefused, match="would empty the store"):
        prune(location, set(), max_fraction=1.0)
    assert prune(location, {ids[0]}, max_fraction=0.1, force=True) == dict.fromkeys(before, 11)
    assert stored(location) == {name: {ids[0]} for name in before}


def test_a_scoped_prune_deletes_only_under_its_prefix(tmp_path):
    location = str(tmp_path / "store")
    wiki, blog = [f"wiki/{i}" for i in range(30)], [f"blog/{i}" for i in range(30)]
    fill(location, wiki + blog)
    # a sync of the wiki alone: unscoped, every blog post looks deleted (refused); scoped, only wiki's go
    with pytest.raises(PruneRefused, match="delete 31 of the 60"):
        prune(location, set(wiki[1:]))
    assert prune(location, set(wiki[1:]), scope="wiki/") == {next(iter(stored(location))): 1}
    assert set(*stored(location).values()) == set(wiki[1:] + blog)
    with pytest.raises(PruneRefused, match="delete 28 of the 59"):  # the share is of the whole collection
        prune(location, {wiki[1]}, scope="wiki/", max_fraction=0.1)


def write_context(redis_url: str, location: str) -> WorkerContext:
    settings = Settings.from_env({}, store=location, redis_url=redis_url)
    redis = Redis.from_url(redis_url)
    queues = {s: queue(redis, s, settings.namespace) for s in STAGES}
    return WorkerContext(settings, redis, RedisLedger(redis, settings.keys), queues)


def test_the_prune_job_records_a_refusal_as_a_dead_letter_and_obeys_a_forced_request(tmp_path, redis_url):
    location = str(tmp_path / "store")
    ids = [f"doc-{i:03d}" for i in range(40)]
    fill(location, ids)
    ctx = write_context(redis_url, location)

    ctx.redis.set(keys.DEFAULT.kept_ids("t1"), PruneRequest(ids[:20]).encode())
    assert prune_job(ctx, "t1") == {"refused": 1}
    assert set(*stored(location).values()) == set(ids), "a refused prune job deleted something"
    (letter,) = ctx.ledger.dead()
    assert letter.doc_id == "prune:t1" and letter.stage == "write" and "delete 20 of the 40" in letter.message
    assert ctx.redis.get(keys.DEFAULT.kept_ids("t1")) is None

    ctx.redis.set(keys.DEFAULT.kept_ids("t2"), PruneRequest(ids[:15], scope="doc-01").encode())
    assert list(prune_job(ctx, "t2").values()) == [5]  # doc-015 .. doc-019: the scope's, few enough
    ctx.redis.set(keys.DEFAULT.kept_ids("t3"), PruneRequest(ids[:5], force=True).encode())
    assert list(prune_job(ctx, "t3").values()) == [30]
    assert set(*stored(location).values()) == set(ids[:5])
    assert len(ctx.ledger.dead()) == 1


def test_a_submitted_prune_sends_its_listing_in_slices_and_the_job_asks_for_it_a_slice_at_a_time(
    tmp_path, redis_url, monkeypatch
):
    """What `enqueue --prune` sends: the IDs in a Redis set written a slice at a time, the claim check
    only their count; the job streams the store's IDs past that set, never holding the listing whole.
    A listing that is not all there (expired, cut short) would make every missing ID look deleted: the
    job refuses it with a dead letter and deletes nothing."""
    monkeypatch.setattr(submit, "KEPT_SLICE", 7)  # many SADDs and SMISMEMBERs for a small store
    monkeypatch.setattr(store_types, "ID_SLICE", 9)
    location = str(tmp_path / "store")
    ids = [f"doc-{i:03d}" for i in range(60)]
    fill(location, ids)
    ctx = write_context(redis_url, location)
    k = ctx.settings.keys
    asked = []
    monkeypatch.setattr(
        ctx.redis, "smismember", lambda key, ids, real=ctx.redis.smismember: asked.append(len(ids)) or real(key, ids)
    )

    token = submit.submit_prune(ctx.redis, ctx.settings, set(ids[:55]))
    request = PruneRequest.decode(ctx.redis.get(k.kept_ids(token)))
    assert (request.kept, request.listed) == ([], 55) and ctx.redis.scard(k.kept_set(token)) == 55
    assert 0 < ctx.redis.ttl(k.kept_set(token)) <= ctx.settings.payload_ttl_s
    assert list(prune_job(ctx, token).values()) == [5]
    assert set(*stored(location).values()) == set(ids[:55])
    assert asked == [9] * 6 + [6], "the store's IDs were not asked about a slice at a time"
    assert ctx.redis.exists(k.kept_ids(token), k.kept_set(token)) == 0

    token = submit.submit_prune(ctx.redis, ctx.settings, set(ids[:50]), force=True)  # past the guard
    ctx.redis.srem(k.kept_set(token), *ids[:30])  # 30 of the 50 IDs lost: without the check, 35 deleted
    assert prune_job(ctx, token) == {"refused": 1}
    assert set(*stored(location).values()) == set(ids[:55]), "a prune of an incomplete listing deleted something"
    (letter,) = ctx.ledger.dead()
    assert letter.doc_id == f"prune:{token}" and "holds 20 of the 50 IDs" in letter.message
    assert ctx.redis.exists(k.kept_ids(token), k.kept_set(token)) == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        PruneRequest(["a"]).encode()[:-1],
        json.dumps({"kept": ["a"], "force": "yes"}).encode(),
        b"\x82\xa4kept\x91\xa1a\xa5force\xa3yes",  # force a string
        b"\x82\xa4kept\x91\xa1a\xacmax_fraction\x02",  # over 1
        b"\x81\xa4what\xc0",  # a field it does not know
        b"\x82\xa4kept\x90\xa6listed\xff",  # a negative count
        b"\x82\xa4kept\x90\xa6listed\xc3",  # a count that is a bool
    ],
)
def test_a_malformed_prune_request_is_a_decode_error(payload):
    with pytest.raises(DecodeError):
        PruneRequest.decode(payload)


def test_a_bare_id_list_from_an_older_client_is_a_default_request():
    assert PruneRequest.decode(b"\x92\xa1a\xa1b") == PruneRequest(["a", "b"])


@pytest.mark.slow
def test_run_prune_refuses_a_half_empty_listing_and_obeys_force_and_scope(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"note-{i:02d}.txt").write_text(f"Note {i} is about kites, tea and bees, number {i}.")
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"))
    embedpipe("run", str(corpus), env=env)
    for i in range(12):  # half the directory is gone (an unmounted share, a half-finished copy)
        (corpus / f"note-{i:02d}.txt").unlink()

    refused = embedpipe("run", str(corpus), "--prune", env=env, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "delete 12 of the 24 documents" in line and "EMBEDPIPE_PRUNE_MAX_FRACTION=0.1" in line
    assert len(set(*stored(env["EMBEDPIPE_STORE"]).values())) == 24

    # scoped to note-0*: only note-00 .. note-09 are candidates, 10 of them: allowed without force
    scoped = json.loads(embedpipe("run", str(corpus), "--prune", "--prune-scope", "note-0", "--json", env=env).stdout)
    assert sum(scoped["pruned"].values()) == 10
    forced = json.loads(embedpipe("run", str(corpus), "--prune", "--force-prune", "--json", env=env).stdout)
    assert sum(forced["pruned"].values()) == 2
    assert set(*stored(env["EMBEDPIPE_STORE"]).values()) == {f"note-{i:02d}.txt" for i in range(12, 24)}
    usage = embedpipe("run", str(corpus), "--force-prune", env=env, check=False)
    assert usage.returncode == 2 and "go with --prune" in usage.stderr
