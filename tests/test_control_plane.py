"""The control plane stays bounded with a big backlog: `failed` lists a page of the newest dead letters and
says how many there are, read page by page from Redis; a janitor round expands a bounded number of failed
jobs; the janitor holds the inbox back while the queues are full. Real Redis; speed is measured in
bench/control_plane.py, not asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY
from redis import Redis
from redis.exceptions import OutOfMemoryError
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from producer import client
from producer.cli import main as cli
from shared import keys
from shared.cache import RedisVectorCache
from shared.ledger import READ_PAGE, RedisLedger
from shared.messages import DeadLetter, Document
from shared.queues import queue
from shared.settings import Settings
from shared.spec import chunk_policy
from workers.chunk import chunk_batch
from workers.embed import embed_part
from workers.janitor import FAILED_JOBS_PER_ROUND, Janitor, expand_failed_jobs
from workers.runtime import init_context

from .servers import start_redis


def fill(redis: Redis, n: int) -> RedisLedger:
    """n dead letters, one a second; every third an embed failure, the rest empty documents."""
    ledger = RedisLedger(redis, keys.DEFAULT)
    ledger.add_dead(
        [
            DeadLetter(
                f"doc-{i:05d}",
                "embed" if i % 3 == 0 else "load",
                "model_error" if i % 3 == 0 else "empty",
                "m",
                at=1e9 + i,
            )
            for i in range(n)
        ]
    )
    return ledger


def test_failed_reads_the_newest_page_across_redis_pages_oldest_first(redis_url):
    ledger = fill(Redis.from_url(redis_url), READ_PAGE * 2 + 500)
    newest = client.failed(ledger, limit=3)
    assert [d.doc_id for d in newest] == ["doc-02497", "doc-02498", "doc-02499"]
    page = client.failed(ledger, limit=2, offset=READ_PAGE - 1)  # a page that straddles two Redis reads
    assert [d.doc_id for d in page] == ["doc-01499", "doc-01500"]
    embeds = client.failed(ledger, stage="embed", limit=700)  # from 2,100 letters: three Redis reads
    assert len(embeds) == 700 and {d.stage for d in embeds} == {"embed"}
    assert [d.at for d in embeds] == sorted(d.at for d in embeds) and embeds[-1].doc_id == "doc-02499"
    everything = client.failed(ledger)
    assert len(everything) == ledger.dead_count() == 2500 and everything == ledger.dead()


def test_the_failed_command_lists_a_page_and_says_how_many_there_are(redis_url):
    fill(Redis.from_url(redis_url), 250)
    runner = CliRunner()
    env = {"EMBEDPIPE_REDIS_URL": redis_url}
    out = runner.invoke(cli, ["failed"], env=env)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 101 and lines[0].startswith("doc-00150 ") and lines[99].startswith("doc-00249 ")
    assert "100 shown of 250 failed documents" in lines[-1] and "--offset 100" in lines[-1]

    out = runner.invoke(cli, ["failed", "--json", "--limit", "20", "--offset", "240"], env=env)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["failed"]
    assert [r["doc_id"] for r in rows] == [f"doc-{i:05d}" for i in range(0, 10)]  # the oldest ten are left
    assert "10 shown of 250" in out.stderr

    out = runner.invoke(cli, ["failed", "--limit", "0"], env=env)
    assert out.output.count("\n") == 250  # every one, and no note


def test_a_janitor_round_expands_at_most_a_bounded_number_of_failed_jobs(redis_url):
    """10k jobs failed in an outage must not make one round last minutes (the inbox waits for it)."""
    redis = Redis.from_url(redis_url)
    registry = FailedJobRegistry("load", connection=redis, serializer=JSONSerializer)
    failed_jobs = FAILED_JOBS_PER_ROUND + 50
    redis.zadd(registry.key, {f"lost-{i}": 4e9 + i for i in range(failed_jobs)})  # jobs whose hashes are gone
    settings, ledger = Settings.from_env({}, redis_url=redis_url), RedisLedger(redis, keys.DEFAULT)

    assert expand_failed_jobs(redis, settings, ledger) == FAILED_JOBS_PER_ROUND
    assert registry.get_job_count(cleanup=False) == 50 and ledger.dead_count() == FAILED_JOBS_PER_ROUND
    assert "job:lost-0" in {d.doc_id for d in ledger.dead()}  # the oldest first
    assert expand_failed_jobs(redis, settings, ledger) == 50
    assert registry.get_job_count(cleanup=False) == 0 and ledger.dead_count() == failed_jobs


def test_the_janitor_leaves_documents_in_the_inbox_while_the_queues_are_full(redis_url):
    """Backpressure on the inbox, as on `enqueue`: a million pushed documents wait there, their smallest
    form, instead of all becoming load jobs whose payloads grow at each stage."""
    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, batch_docs=4, max_backlog_jobs=2)
    redis.rpush(keys.DEFAULT.INBOX, *[json.dumps({"v": 1, "id": f"doc-{i}", "text": "words"}) for i in range(16)])
    janitor = Janitor(settings, redis)
    load = queue(redis, "load", "")

    while janitor.tick():
        pass
    assert load.count == 3 and redis.llen(keys.DEFAULT.INBOX) == 4  # more than 2 jobs queued: the rest waits
    load.empty()  # the loaders caught up
    assert janitor.tick() == 4 and redis.llen(keys.DEFAULT.INBOX) == 0


@pytest.mark.slow
def test_a_cache_ttl_of_zero_keeps_no_vectors_in_redis(redis_url, tokenizer):
    """At millions of chunks the embedding cache is most of Redis (1.4 KB a chunk): it can be turned off."""
    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, cache_ttl_s=0)
    ctx = init_context(settings, "embed", redis)
    docs = [Document(f"d{i}", f"Green tea number {i} is steeped at 80 degrees.", f"d{i}") for i in range(3)]
    chunks = chunk_batch(docs, tokenizer, chunk_policy(settings, tokenizer))
    vectors, failed, _ = embed_part(chunks, ctx.embedder, ctx.spec, ctx.cache)
    assert len(vectors) == len(chunks) == 3 and not failed
    assert not list(redis.scan_iter(keys.vector_cache("*")))


@pytest.mark.slow  # a redis-server of its own, with a small maxmemory
def test_the_cache_stops_growing_at_its_share_of_maxmemory_and_a_refused_write_fails_no_part(tmp_path):
    """A million documents make ~6 GB of cache, twice the deployed maxmemory (3 GB, noeviction): past its
    share of maxmemory the cache stores no new vectors, and a write Redis refuses (OOM) is skipped."""
    server, port = start_redis(tmp_path, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    try:
        redis = Redis(port=port)
        skipped = {
            r: lambda r=r: REGISTRY.get_sample_value("embedpipe_embed_cache_skipped_total", {"reason": r}) or 0
            for r in ("full", "refused")
        }
        vectors = {f"fp:{i}": np.full(256, i, dtype=np.float32) for i in range(100)}
        first, rest = dict(list(vectors.items())[:50]), dict(list(vectors.items())[50:])
        cache = RedisVectorCache(redis, 3600, max_share=0.5)
        cache.put_many(first)
        assert len(cache.get_many(list(first), 256)) == 50

        for i in range(40):  # 40 of 64 MB: past half
            redis.set(f"ballast:{i}", b"x" * 2**20)
        cache.memory.every_s = 0  # read Redis's memory at every put
        full = skipped["full"]()
        cache.put_many(rest)
        assert cache.get_many(list(rest), 256) == {} and skipped["full"]() == full + 50
        assert len(cache.get_many(list(first), 256)) == 50, "what the cache held is still served"

        whole = RedisVectorCache(redis, 3600, max_share=1.0)  # up to maxmemory: it finds room ...
        assert whole.has_room()
        redis.config_set("maxmemory", "1mb")  # ... then Redis is full before its next look
        with pytest.raises(OutOfMemoryError):
            redis.set("queued-work", b"x")
        whole.memory.every_s = 3600
        refused = skipped["refused"]()
        whole.put_many(rest)  # OOM from Redis: skipped, not raised
        assert skipped["refused"]() == refused + 50 and whole.get_many(list(rest), 256) == {}
    finally:
        server.terminate()
        server.wait()


@pytest.mark.slow
def test_the_chunk_and_write_workers_keep_their_own_small_index_cache(redis_url, tmp_path):
    """They only look IDs up (BTREE pages): their LanceDB index cache is EMBEDPIPE_WRITER_INDEX_CACHE_MB,
    so their memory stays flat as the store grows; the search processes keep EMBEDPIPE_INDEX_CACHE_MB."""
    redis = Redis.from_url(redis_url)
    env = {"EMBEDPIPE_STORE": str(tmp_path / "store"), "EMBEDPIPE_WRITER_INDEX_CACHE_MB": "48"}
    settings = Settings.from_env(env, redis_url=redis_url)
    assert settings.index_cache_mb == 1024
    for stage in ("chunk", "write"):
        assert init_context(settings, stage, redis).store.settings.index_cache_mb == 48
