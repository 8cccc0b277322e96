"""What the pipeline is doing: per-stage job counts, workers, documents done and failed."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Worker

from shared import keys
from shared.ledger import LocalLedger, RedisLedger
from shared.settings import STAGES


def distributed_status(redis: Redis) -> dict[str, Any]:
    from workers.runtime import queue

    stages = {}
    for stage in STAGES:
        q = queue(redis, stage)
        stages[stage] = {
            "queued": q.count,
            "dequeuing": int(redis.llen(q.intermediate_queue_key)),  # popped, not yet started
            # counted as they are (cleanup=False): reading status writes nothing (a read-only producer
            # may ask), and the janitor cleans the registries every few seconds anyway
            "running": q.started_job_registry.get_job_count(cleanup=False),
            "scheduled": q.scheduled_job_registry.get_job_count(cleanup=False),  # waiting for a retry
            "deferred": q.deferred_job_registry.get_job_count(cleanup=False),
            "failed": q.failed_job_registry.get_job_count(cleanup=False),
            "workers": Worker.count(queue=q),
        }
    ledger = RedisLedger(redis)  # read-only here
    counters = ledger.counters()
    return {
        "mode": "distributed",
        "inbox": int(redis.llen(keys.INBOX)) + inbox_held(redis),
        "stages": stages,
        "documents_done": counters.get("documents_done", 0),
        "documents_failed": ledger.dead_count(),
        "chunks_written": counters.get("chunks_written", 0),
        "probe": ledger.last_probe(),
    }


def inbox_held(redis: Redis) -> int:
    """Messages a janitor took from the inbox and has not enqueued yet (workers/inbox.py)."""
    takers = [m.decode() for m in redis.smembers(keys.INBOX_TAKERS)]
    with redis.pipeline(transaction=False) as pipe:
        for taker in takers:
            pipe.llen(keys.inbox_taken(taker))
        return sum(pipe.execute()) if takers else 0


def is_idle(status: dict[str, Any]) -> bool:
    """Nothing waiting, running or scheduled for retry anywhere (failed jobs do not count)."""
    busy = ("queued", "dequeuing", "running", "scheduled", "deferred")
    return status["inbox"] == 0 and all(s[k] == 0 for s in status["stages"].values() for k in busy)


def local_status(ledger: LocalLedger, chunks_stored: int) -> dict[str, Any]:
    counters = ledger.counters()
    return {
        "mode": "embedded",
        "documents_done": counters.get("documents_done", 0),
        "documents_failed": ledger.dead_count(),
        "chunks_written": counters.get("chunks_written", 0),
        "chunks_stored": chunks_stored,
        "probe": ledger.last_probe(),
    }
