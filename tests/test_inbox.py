"""The janitor never stops for one message, one broken step or one dead janitor: hostile inbox
messages become dead letters with storable IDs, each housekeeping step fails alone, two janitors share
the inbox without losing or doubling a document, a batch held by a dead janitor goes back, and batches
are bounded in bytes. Real Redis, real janitor processes."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import time

import msgpack
import psutil
import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from producer.status import inbox_held
from shared import keys, metrics
from shared.ledger import RedisLedger
from shared.messages import decode_sources
from shared.settings import Settings
from workers.inbox import Inbox
from workers.janitor import Janitor

from .helpers import EMBEDPIPE, cli_env, embedpipe, wait_until

HOSTILE = [
    b'{"v":1,"id":"surrogate","text":"hi \\ud800 there"}',  # what JavaScript sends for a cut emoji
    b'{"v":1,"id":"lone \\udc00 id","text":"x"}',
    b"[" * 2000 + b"]" * 2000,  # JSON nested 2,000 deep
    b'{"v":1,"id":"' + b"i" * 1_000_000 + b'","text":"x"}',  # a 1 MB ID
    b'{"v":1,"id":"ctl\\u0000id","text":"x"}',
    b'{"v":1,"id":"meta","text":"x","metadata":{"n":NaN}}',
    b"\x91" * 3000 + b"\xc0",  # msgpack arrays nested 3,000 deep
    msgpack.packb({"v": 1, "id": "bin-meta", "text": "x", "metadata": {"blob": b"\x00\x01"}}),
    b"\xff\xfe not anything",
    b'{"v":1,"id":"esc","text":"x","\\u001b]0;pwned\\u0007\\u001b[2J":1}',  # a field name that would rewrite a screen
]


def load_batches(redis: Redis) -> list[list[str]]:
    """The document IDs of each load batch the janitor enqueued, read from the claim checks."""
    q = Queue("load", connection=redis, serializer=JSONSerializer)
    return [[s["id"] for s in decode_sources(redis.get(keys.DEFAULT.sources(job.args[0])))] for job in q.get_jobs()]


@pytest.mark.slow
def test_hostile_messages_become_dead_letters_and_the_round_goes_on(redis_url):
    redis = Redis.from_url(redis_url)
    good = [json.dumps({"v": 1, "id": f"good-{i}", "text": f"document {i}"}).encode() for i in range(5)]
    redis.rpush(keys.DEFAULT.INBOX, good[0], *HOSTILE[:4], good[1], *HOSTILE[4:], *good[2:])
    janitor = Janitor(Settings.from_env({}, redis_url=redis_url), redis)
    before = time.time()
    assert janitor.tick(flush=True) == len(good) + len(HOSTILE)
    assert load_batches(redis) == [[f"good-{i}" for i in range(5)]]
    dead = RedisLedger(redis, keys.DEFAULT).dead()
    assert len(dead) == len(HOSTILE) and all(d.reason == "decode_error" and d.stage == "inbox" for d in dead)
    for letter in dead:  # storable and printable IDs, bounded messages
        letter.doc_id.encode("utf-8")
        assert len(letter.doc_id) <= 512 and "\x00" not in letter.doc_id and len(letter.message) <= 500
    assert float(redis.get(keys.DEFAULT.JANITOR_TICK)) >= before  # a good round
    listed = embedpipe("failed", "--redis", env=cli_env(EMBEDPIPE_REDIS_URL=redis_url)).stdout
    assert listed.count("\n") == len(HOSTILE) and "\x1b" not in listed and "\\x1b]0;pwned" in listed
    assert redis.llen(keys.DEFAULT.INBOX) == 0 and not redis.smembers(keys.DEFAULT.INBOX_TAKERS) - {
        janitor.inbox.id.encode()
    }
    assert redis.llen(keys.DEFAULT.inbox_taken(janitor.inbox.id)) == 0


@pytest.mark.slow
def test_the_registry_clean_up_every_5_s_logs_nothing_at_info(redis_url, caplog):
    """rq's maintenance logs each queue's clean-up at INFO, whatever EMBEDPIPE_LOG_LEVEL: four lines a
    round, ~70k a day, filled the janitor's log of a 1M-document run at WARNING."""
    redis = Redis.from_url(redis_url)
    janitor = Janitor(Settings.from_env({}, redis_url=redis_url), redis)
    with caplog.at_level(logging.INFO):
        janitor.tick()
    assert janitor._last_clean > 0  # this round cleaned the registries
    assert not [r.getMessage() for r in caplog.records if "cleaning registries" in r.getMessage()]


@pytest.mark.slow
def test_a_broken_step_fails_alone_and_the_janitor_reports_it(redis_url):
    redis = Redis.from_url(redis_url)
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url)
    janitor = Janitor(Settings.from_env({}, redis_url=redis_url), redis)
    janitor.tick(flush=True)
    assert embedpipe("health", "--stage", "janitor", env=env).returncode == 0
    # a client overwrote rq's scheduled registry of the load queue with a string: the scheduler step
    # and the export (which counts that registry) fail; the inbox step must still batch documents
    redis.set("rq:scheduled:load", "not a sorted set")
    errors = {s: metrics.JANITOR_STEP_ERRORS.labels(s)._value.get() for s in ("scheduler", "export", "inbox")}
    redis.rpush(keys.DEFAULT.INBOX, json.dumps({"v": 1, "id": "still-batched", "text": "the inbox goes on"}))
    redis.set(keys.DEFAULT.JANITOR_TICK, time.time() - 3600)  # the last good round, an hour ago
    janitor._last_export = 0.0
    assert janitor.tick(flush=True) == 1
    assert load_batches(redis)[-1] == ["still-batched"]
    assert metrics.JANITOR_STEP_ERRORS.labels("scheduler")._value.get() == errors["scheduler"] + 1
    assert metrics.JANITOR_STEP_ERRORS.labels("export")._value.get() == errors["export"] + 1
    assert metrics.JANITOR_STEP_ERRORS.labels("inbox")._value.get() == errors["inbox"]
    assert float(redis.get(keys.DEFAULT.JANITOR_TICK)) < time.time() - 3000  # not a good round: no advance
    sick = embedpipe("health", "--stage", "janitor", env=env, check=False)
    assert sick.returncode == 1 and "last round with every step done" in sick.stderr
    assert "Traceback" not in sick.stderr
    redis.delete("rq:scheduled:load")  # mended: the next round is good again
    janitor._last_export = 0.0
    janitor.tick(flush=True)
    assert embedpipe("health", "--stage", "janitor", env=env).returncode == 0


@pytest.mark.slow
def test_two_janitors_share_the_inbox_without_losing_or_doubling_a_document(redis_url, tmp_path):
    redis = Redis.from_url(redis_url)
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_BATCH_DOCS="16",
        EMBEDPIPE_INBOX_WAIT_S="0.05",
        EMBEDPIPE_LOG_LEVEL="INFO",
    )
    logs = [open(tmp_path / f"janitor-{i}.log", "w") for i in range(2)]
    janitors = [
        subprocess.Popen([EMBEDPIPE, "janitor"], env=env, stdout=subprocess.DEVNULL, stderr=log) for log in logs
    ]
    try:
        rng = random.Random(5)
        ids = [f"doc-{i:04d}" for i in range(2000)]
        for start in range(0, len(ids), 50):  # clients push to both ends while both janitors take
            pipe = redis.pipeline(transaction=False)
            for doc_id in ids[start : start + 50]:
                message = json.dumps({"v": 1, "id": doc_id, "text": f"text of {doc_id}"})
                (pipe.lpush if rng.random() < 0.3 else pipe.rpush)(keys.DEFAULT.INBOX, message)
            pipe.execute()
            time.sleep(0.02)
        # no workers here: wait for the inbox and the janitors' hands only
        wait_until(
            lambda: redis.llen(keys.DEFAULT.INBOX) + inbox_held(redis, keys.DEFAULT) == 0,
            60,
            "the janitors drained the inbox",
        )
    finally:
        for j in janitors:
            j.terminate()
        codes = [j.wait(30) for j in janitors]
        for log in logs:
            log.close()
    taken = [i for batch in load_batches(redis) for i in batch]
    assert len(taken) == len(set(taken)) == len(ids) and set(taken) == set(ids)  # each exactly once
    assert codes == [0, 0] and RedisLedger(redis, keys.DEFAULT).dead_count() == 0
    batched = [(tmp_path / f"janitor-{i}.log").read_text().count("documents batched") for i in range(2)]
    assert min(batched) > 0, f"one janitor took every batch, so nothing raced: {batched}"


def test_a_batch_held_by_a_dead_janitor_goes_back_and_is_enqueued_once(redis_url):
    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, batch_docs=10)
    ledger = RedisLedger(redis, keys.DEFAULT)
    redis.rpush(keys.DEFAULT.INBOX, *[json.dumps({"v": 1, "id": f"d{i}", "text": "x"}) for i in range(25)])
    # a janitor takes a batch, then dies before enqueueing it (its liveness key never refreshed again)
    doomed = Inbox(redis, settings, ledger, "doomed")
    held = doomed.take(flush=True)
    assert len(held) == 10 and redis.llen(keys.DEFAULT.INBOX) == 15
    survivor = Janitor(settings, redis)
    assert survivor.inbox.recover() == 10  # its owner is not alive: back at the head, in order
    assert [json.loads(m)["id"] for m in redis.lrange(keys.DEFAULT.INBOX, 0, 9)] == [f"d{i}" for i in range(10)]
    while survivor.tick(flush=True):
        pass
    everything = sorted(f"d{i}" for i in range(25))
    assert sorted(i for b in load_batches(redis) for i in b) == everything
    # it was only paused, not dead: it wakes up and enqueues what it held; that transaction is void
    assert doomed.commit(held) == 0
    assert sorted(i for b in load_batches(redis) for i in b) == everything  # enqueued once


@pytest.mark.slow
def test_batches_are_bounded_in_bytes_and_the_janitor_stays_small(redis_url, tmp_path):
    redis = Redis.from_url(redis_url)
    big = "word " * 400_000  # 2 MB of text per document
    env = cli_env(EMBEDPIPE_REDIS_URL=redis_url, EMBEDPIPE_INBOX_WAIT_S="0.05")
    redis.rpush(keys.DEFAULT.INBOX, *[json.dumps({"v": 1, "id": f"big-{i}", "text": big}) for i in range(64)])
    janitor = subprocess.Popen([EMBEDPIPE, "janitor", "--burst"], env=env, stdout=subprocess.DEVNULL)
    peak = 0
    proc = psutil.Process(janitor.pid)
    while janitor.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    assert janitor.returncode == 0
    batches = load_batches(redis)
    assert sorted(i for b in batches for i in b) == sorted(f"big-{i}" for i in range(64))
    assert max(len(b) for b in batches) <= Settings().batch_bytes // 2_000_000  # 8 of 2 MB in 16 MiB
    assert peak < 256 * 2**20, f"the janitor's peak RSS was {peak / 2**20:.0f} MB"  # the k8s limit


def test_dead_letters_are_bounded_in_age_and_number(redis_url):
    """A flood of bad input must not fill Redis: the janitor forgets the oldest dead letters beyond a
    count and any older than their retention, with their kept sources."""
    from shared.messages import DeadLetter

    redis = Redis.from_url(redis_url)
    ledger = RedisLedger(redis, keys.DEFAULT)
    now = time.time()
    old = [
        DeadLetter(f"old-{i}", "load", "empty", "x", at=now - 100 * 86400, source={"id": f"old-{i}"}) for i in range(3)
    ]
    flood = [DeadLetter(f"bad-{i:04d}", "inbox", "decode_error", "x", at=now + i) for i in range(1200)]
    ledger.add_dead(old + flood)
    settings = Settings.from_env({}, redis_url=redis_url, max_dead_letters=1000, dead_letter_ttl_s=90 * 86400)
    janitor = Janitor(settings, redis)
    janitor.tick()  # its first round cleans up
    kept = {d.doc_id for d in ledger.dead()}
    assert len(kept) == 1000 and kept == {f"bad-{i:04d}" for i in range(200, 1200)}  # the newest 1,000
    assert not any(redis.exists(keys.DEFAULT.dead_source(f"old-{i}")) for i in range(3))
    assert (
        redis.zcard(keys.DEFAULT.DEAD_BY_TIME)
        == redis.hlen(keys.DEFAULT.DEAD)
        == redis.hlen(keys.DEFAULT.DEAD_ATTEMPTS)
        == 1000
    )


def test_documents_of_a_batch_whose_payloads_expired_each_become_dead_letters(redis_url):
    """A pipeline stalled past EMBEDPIPE_PAYLOAD_TTL_S loses a batch's claim checks: its documents must
    still each end as a dead letter, not as one letter for the batch (or nothing)."""
    from rq.serializers import JSONSerializer

    from producer.submit import submit
    from shared.messages import SourceDoc
    from workers.janitor import expand_failed_jobs
    from workers.runtime import StageWorker, init_context

    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, job_retries=0)
    submit(redis, settings, [SourceDoc(f"doc-{i}", text="words") for i in range(3)])
    [batch] = [k.decode().rsplit(":", 1)[1] for k in redis.keys(keys.DEFAULT.sources("*"))]
    redis.delete(keys.DEFAULT.sources(batch))  # expired
    ctx = init_context(settings, "load", redis)
    StageWorker([ctx.queues["load"]], context=ctx, connection=redis, serializer=JSONSerializer).work(burst=True)
    expand_failed_jobs(redis, settings, ctx.ledger)
    letters = {d.doc_id: d for d in ctx.ledger.dead()}
    assert set(letters) == {"doc-0", "doc-1", "doc-2"}
    assert all(d.reason == "job_failed" and "missing" in d.message for d in letters.values())
