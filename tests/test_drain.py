"""When the writer takes a bulk load to have ended (and builds pgvector's index, compacts LanceDB)."""

from __future__ import annotations

from redis import Redis

from shared.settings import Settings
from workers.runtime import init_context
from workers.write import load_drained


def test_a_load_has_drained_only_when_the_inbox_and_every_stages_queue_are_empty(redis_url, tmp_path):
    """Behind a fast embedder the embed and write queues empty while documents still wait to be loaded or
    chunked: taken for the load's end, that built pgvector's HNSW index at a fifth of a 20k-document load,
    and every later part paid its insertion into the graph (bench/README.md)."""
    redis = Redis.from_url(redis_url)
    settings = Settings.from_env({}, redis_url=redis_url, store=str(tmp_path / "store"))
    ctx = init_context(settings, "write", redis)
    assert load_drained(ctx)

    for stage in ("load", "chunk", "embed", "write"):
        job = ctx.queues[stage].enqueue_call("workers.write.write_job", args=("waiting",))
        assert not load_drained(ctx), f"a {stage} job waits"
        job.delete()
    assert load_drained(ctx)

    redis.rpush(settings.keys.INBOX, b'{"v": 1, "id": "d", "text": "not yet batched"}')
    assert not load_drained(ctx)
