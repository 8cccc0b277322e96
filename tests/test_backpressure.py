"""Backpressure in bytes: past EMBEDPIPE_HOLD_REDIS_SHARE of Redis's maxmemory the producer, the janitor,
the loaders, the chunkers and the embedders wait while a later stage has work queued, so no stage
running ahead of the next fills Redis (noeviction: a full Redis refuses claim checks and rq's records:
jobs fail, workers exit).
Each test runs a redis-server of its own with a small maxmemory."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner
from redis import Redis

from producer.cli import main as cli
from producer.cli_client import redis_line
from shared import keys
from shared.backpressure import Backpressure
from shared.messages import SourceDoc
from shared.queues import distributed_status, is_idle, queue
from shared.settings import Settings
from workers.janitor import Janitor

from .helpers import assert_nothing_lost, cli_env, embedpipe, expected_chunks, scrape, wait_until, worker_pool
from .servers import start_redis

WORDS = "cell protein gene tumour patient dose trial immune receptor signal pathway growth mouse blood".split()


@pytest.fixture
def small_redis(tmp_path):
    """A redis-server of this test's own with maxmemory 16 MB, noeviction (as deployed)."""
    server, port = start_redis(tmp_path, "--maxmemory", "16mb", "--maxmemory-policy", "noeviction")
    yield port
    server.terminate()
    server.wait()


def fill_to(redis: Redis, share: float) -> None:
    """Ballast keys until Redis uses `share` of its maxmemory."""
    limit = int(redis.config_get("maxmemory")["maxmemory"])
    i = 0
    while int(redis.info("memory")["used_memory"]) < share * limit:
        redis.set(f"ballast:{i}", b"x" * 2**18)
        i += 1


@pytest.mark.slow  # a redis-server of its own
def test_past_the_share_each_stage_waits_only_while_a_later_stage_has_work(small_redis):
    redis = Redis(port=small_redis)
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{small_redis}/0")
    who = ("enqueue", "inbox", "load", "chunk", "embed")
    pressure = {w: Backpressure(redis, settings, w) for w in who}

    def waiting() -> set[str]:
        return {w for w, p in pressure.items() if p.held()}

    redis.rpush(queue(redis, "write", "").key, "a-job-id")
    assert waiting() == set(), "below the share nothing waits"
    fill_to(redis, 0.85)
    assert waiting() == set(who), "write jobs queued: everything before the writers waits"
    assert pressure["embed"].held().startswith("Redis at 8")
    for stage, moves in (("embed", {"embed"}), ("chunk", {"chunk", "embed"}), ("load", {"load", "chunk", "embed"})):
        redis.delete(*(queue(redis, s, "").key for s in ("load", "chunk", "embed", "write")))
        redis.rpush(queue(redis, stage, "").key, "a-job-id")
        assert waiting() == set(who) - moves, f"{stage} jobs queued: the stage before them feeds them"
    redis.delete(queue(redis, "load", "").key)
    assert waiting() == set(), "nothing queued: whatever else fills Redis, new work moves on"


@pytest.mark.slow  # a redis-server of its own
def test_the_janitor_keeps_the_inbox_while_redis_is_past_the_share_and_work_is_queued(small_redis):
    redis = Redis(port=small_redis)
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{small_redis}/0", batch_docs=4)
    redis.rpush(keys.DEFAULT.INBOX, *[json.dumps({"v": 1, "id": f"doc-{i}", "text": "words"}) for i in range(8)])
    janitor = Janitor(settings, redis)
    fill_to(redis, 0.85)
    assert janitor.tick() == 4, "nothing queued yet: the first batch goes"
    assert janitor.tick() == 0 and redis.llen(keys.DEFAULT.INBOX) == 4, "its load job queued: the rest waits"
    queue(redis, "load", "").empty()  # the loaders took it
    assert janitor.tick() == 4


@pytest.mark.slow  # real worker processes, the static model and a redis-server of their own
def test_loaders_and_chunkers_ahead_of_the_embedders_hold_instead_of_filling_redis(small_redis, tmp_path, static_model):
    """3,000 documents of ~2 KB: their sources fit in 16 MB of Redis, chunked they would not. With no
    embedders yet, the loaders and chunkers stop at the share; the embedders then drain it all."""
    rng = random.Random(3)
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": f"doc-{i:04d}", "text": " ".join(rng.choice(WORDS) for _ in range(250))} for i in range(3000)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    url = f"redis://127.0.0.1:{small_redis}/0"
    env = cli_env(
        EMBEDPIPE_REDIS_URL=url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_MODEL=str(static_model),
        EMBEDPIPE_BATCH_DOCS="20",  # a chunk job grows Redis by ~0.3 MB: well inside the 20% above the share
    )
    redis = Redis(port=small_redis)
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("EMBEDPIPE_")})
    limit = int(redis.config_get("maxmemory")["maxmemory"])
    peak = 0

    def peak_memory() -> int:
        nonlocal peak
        peak = max(peak, int(redis.info("memory")["used_memory"]))
        return peak

    ahead = {"load": 1, "chunk": 1}
    with worker_pool(env, tmp_path / "ahead", redis, ahead, metrics=True) as early:
        embedpipe("enqueue", str(corpus), "--no-progress", env=env)  # the sources fit: ~5 MB

        def held() -> bool:
            peak_memory()
            return all(
                scrape(early.metrics_ports[f"{s}-0"])[("embedpipe_backpressure_held_seconds_total", (("stage", s),))]
                > 0
                for s in ahead
            )

        wait_until(held, 240, "the loaders and chunkers held at the share", interval_s=0.2)
        assert queue(redis, "embed", "").count > 0, "the work waits for the embedders"
        assert " of 16 MB maxmemory (" in embedpipe("status", env=env).stdout  # the line redis_line() makes
        with worker_pool(env, tmp_path / "rest", redis, {"embed": 1, "write": 1}):
            wait_until(lambda: peak_memory() and is_idle(distributed_status(redis, settings)), 300, "all stored")
        failed = {
            s: scrape(early.metrics_ports[f"{s}-0"])[("embedpipe_jobs_total", (("outcome", "failed"), ("stage", s)))]
            for s in ahead
        }
        assert failed == {"load": 0, "chunk": 0}, "no job met a full Redis"
    early.assert_clean_exit()
    expected = expected_chunks(settings, [SourceDoc(d["id"], text=d["text"]) for d in docs])
    assert assert_nothing_lost(env, expected) == {"stored": 3000, "dead": 0}
    assert peak < limit, f"Redis peaked at {peak / 2**20:.1f} MB of {limit / 2**20:.0f}"  # it was never full


@pytest.mark.slow  # a redis-server of its own
def test_enqueue_into_a_full_redis_says_so_in_one_line_without_the_document(small_redis, tmp_path):
    redis = Redis(port=small_redis)
    redis.config_set("maxmemory", int(redis.info("memory")["used_memory"]) + 2**16)
    corpus = tmp_path / "doc.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "text": "PRIVATE-TEXT " * 2000}) + "\n")
    url = f"redis://127.0.0.1:{small_redis}/0"
    result = CliRunner().invoke(cli, ["enqueue", str(corpus), "--no-progress", "--redis-url", url])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Redis is full" in lines[0] and "PRIVATE-TEXT" not in lines[0], result.output


def test_status_says_how_full_redis_is_and_whether_the_pipeline_holds():
    mb = 2**20
    assert redis_line({"used_bytes": 5 * mb, "maxmemory_bytes": 0}, 0.8) == "redis: 5 MB used, no maxmemory"
    half = redis_line({"used_bytes": 50 * mb, "maxmemory_bytes": 100 * mb}, 0.8)
    assert half == "redis: 50 of 100 MB maxmemory (50%)"
    past = redis_line({"used_bytes": 85 * mb, "maxmemory_bytes": 100 * mb}, 0.8)
    assert past.startswith("redis: 85 of 100 MB maxmemory (85%): past 80%, new work and the loaders")
