"""The job lease: a killed worker's job is redone within a minute whatever its timeout, a live worker
keeps its long job, and a worker that cannot renew its lease ends itself. Real Redis, real workers."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
from redis import Redis
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.messages import SourceDoc
from shared.queues import queue
from shared.settings import Settings
from workers.lease import LEASE_LOST_EXIT_CODE

from .helpers import assert_nothing_lost, cli_env, embedpipe, expected_chunks, process_of, running_job, worker_pool
from .servers import start_redis

pytestmark = pytest.mark.slow

WORDS = (
    "river stone garden lantern harbor meadow copper violin orchard glacier pepper saddle candle thunder "
    "willow marble falcon quarry ribbon tunnel walnut beacon canyon velvet"
).split()


def long_documents(n: int) -> list[dict[str, str]]:
    """n documents of ~200 tokens each: one chunk apiece, and seconds of embedding per hundred on a CPU."""
    rng = random.Random(3)
    return [
        {"id": f"long-{i:04d}", "text": f"Field note {i}: " + " ".join(rng.choice(WORDS) for _ in range(180)) + "."}
        for i in range(n)
    ]


def lease_env(redis_url: str, tmp_path, docs: int, **extra: str) -> dict[str, str]:
    """One batch, one embed part of `docs` chunks, an embed timeout far beyond any wait here."""
    settings = {
        "EMBEDPIPE_REDIS_URL": redis_url,
        "EMBEDPIPE_STORE": str(tmp_path / "store"),
        "EMBEDPIPE_EMBED_TIMEOUT_S": "3600",
        "EMBEDPIPE_BATCH_DOCS": str(docs),
        "EMBEDPIPE_PART_MAX_CHUNKS": "512",
        "EMBEDPIPE_INBOX_WAIT_S": "0.2",
        "EMBEDPIPE_LOG_LEVEL": "INFO",
    }
    return cli_env(**(settings | extra))


def enqueue(env: dict[str, str], tmp_path, docs: list[dict[str, str]]) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    embedpipe("enqueue", str(tmp_path / "docs.jsonl"), env=env)


def logs_of(tmp_path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))


def test_a_killed_workers_long_job_is_redone_within_its_lease(redis_url, tmp_path, tokenizer):
    docs = long_documents(100)
    env = lease_env(redis_url, tmp_path, len(docs))
    redis = Redis.from_url(redis_url)
    with worker_pool(env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 2, "write": 1}) as pool:
        enqueue(env, tmp_path, docs)
        job_id, worker_name = running_job(redis, "embed")
        victim = process_of(pool, redis, worker_name)
        time.sleep(1)  # well inside the job: 100 chunks take seconds
        assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status() == "started"
        pool.kill(victim)
        # and a cleaner (janitor or worker) SIGKILLed while it cleaned this queue left the queue's maintenance
        # lock behind: with rq's own lock (899 s) nobody recovered the job for 15 minutes (a CI hang)
        assert queue(redis, "embed", "").acquire_maintenance_lock()
        # without the lease, rq would hand the job back 3,600 + 60 s after its start
        embedpipe("wait", "--timeout", "150", env=env, timeout=200)
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "finished" and job.retries_left == 2  # redone once, through rq's retry
        assert job.latest_result().worker_name != worker_name
    sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
    expected = expected_chunks(Settings.from_env(env), sources, tokenizer)
    assert assert_nothing_lost(env, expected) == {"stored": len(docs), "dead": 0}
    pool.assert_clean_exit(victim)


def test_a_live_workers_job_of_many_leases_is_never_taken_from_it(redis_url, tmp_path, tokenizer):
    lease_s = 3  # the shortest allowed
    docs = long_documents(800)  # one embed job of ~25-80 s on 2 cores (12 s for 400 on a quiet EPYC): 8+ leases
    env = lease_env(
        redis_url,
        tmp_path,
        len(docs),
        EMBEDPIPE_JOB_LEASE_S=str(lease_s),
        EMBEDPIPE_PART_MAX_CHUNKS="1024",
        EMBEDPIPE_PART_MAX_TOKENS="400000",
    )
    redis = Redis.from_url(redis_url)
    with worker_pool(env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 1, "write": 1}) as pool:
        enqueue(env, tmp_path, docs)
        job_id, worker_name = running_job(redis, "embed")
        time.sleep(2.5 * lease_s)  # leases after its start: still held by its worker, which is still listed
        entries = redis.zrange(queue(redis, "embed", "").started_job_registry.key, 0, -1, withscores=True)
        held = [score for entry, score in entries if entry.decode().startswith(job_id + ":")]
        assert held and held[0] > time.time(), f"the lease was not renewed: {entries}"
        assert redis.ttl(Worker.redis_worker_namespace_prefix + worker_name) > lease_s
        embedpipe("wait", "--timeout", "600", env=env, timeout=660)
        assert all(pool.alive().values()), "a worker died"
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "finished" and job.retries_left == 3, "the job was taken back and retried"
    assert (job.ended_at - job.started_at).total_seconds() > 3 * lease_s, "the job was too short to test the lease"
    batch_id, part = job.args
    assert logs_of(tmp_path).count(f"embed {batch_id}/{part}:") == 1  # embedded exactly once
    sources = [SourceDoc(d["id"], text=d["text"]) for d in docs]
    expected = expected_chunks(Settings.from_env(env), sources, tokenizer)
    assert assert_nothing_lost(env, expected) == {"stored": len(docs), "dead": 0}
    pool.assert_clean_exit()


@pytest.mark.parametrize("outage", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_worker_whose_redis_goes_away_mid_job_ends_itself(tmp_path, outage):
    """Killed: beats fail at once. Hung (stopped, its sockets open): only the beat's timeouts end them."""
    server, port = start_redis(tmp_path)  # ours alone: this test kills it
    redis = Redis(port=port)
    docs = long_documents(100)
    env = lease_env(f"redis://127.0.0.1:{port}/0", tmp_path, len(docs), EMBEDPIPE_JOB_LEASE_S="4")
    try:
        with worker_pool(env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 1}) as pool:
            try:
                enqueue(env, tmp_path, docs)
                running_job(redis, "embed")
                server.send_signal(outage)
                assert pool.procs["embed-0"].wait(60) == LEASE_LOST_EXIT_CODE
                log = (tmp_path / "logs" / "embed-0.log").read_text()
                assert f"exiting with code {LEASE_LOST_EXIT_CODE}" in log, log[-2000:]
            finally:  # before the pool's SIGTERM, which they would wait out for a minute each
                for name, alive in pool.alive().items():
                    if alive:  # the others retry Redis forever: nothing more to learn from them
                        pool.kill(name)
    finally:
        server.kill()  # SIGKILL ends a stopped process too
        server.wait(10)
