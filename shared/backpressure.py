"""Backpressure: when new work may enter the pipeline, and when a pool that grows the work in Redis
(load, chunk, embed) may take its next job.

Two bounds. In jobs: the producer and the janitor (batching the inbox) wait while more than
EMBEDPIPE_MAX_BACKLOG_JOBS are queued. In bytes: past EMBEDPIPE_HOLD_REDIS_SHARE of Redis's maxmemory,
the producer, the janitor, the loaders, the chunkers and the embedders wait while a later stage has
jobs queued. A document grows ~7x in Redis from the message that brought it to its embedded form
(deploy/README.md), so a stage that runs ahead of the next fills Redis, and a full Redis (noeviction)
refuses claim checks and rq's own records alike: failed jobs, workers that exit. Holding them lets the
work already in flight drain (the writers delete each batch's claim checks). The pool furthest down
with work queued never waits, so the pipeline always moves, whatever else fills Redis.
"""

from __future__ import annotations

import logging
import math
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.queues import backlog, pools, queue, queue_lengths, redis_memory, stage_of
from shared.settings import Settings

log = logging.getLogger(__name__)

# Every check reads Redis's memory afresh (INFO: ~0.1 ms): a loader takes ~100 small jobs a second, and on
# a one-second-old reading it ran 56 of them past the share and filled a 16 MB Redis (tests/test_backpressure.py).
MEMORY_CHECK_S = 0.0
HOLD_POLL_S = 1.0
# Who waits, and for the jobs of which later stages. "enqueue": the producer (its backlog counts the
# inbox); "inbox": the janitor (the inbox is what it drains).
LATER = {
    "enqueue": ("load", "chunk", "embed", "write"),
    "inbox": ("load", "chunk", "embed", "write"),
    "load": ("chunk", "embed", "write"),
    "chunk": ("embed", "write"),
    "embed": ("write",),  # its vectors add ~50% to a chunked document (a fast embedder ahead of the writers)
}


class RedisMemory:
    """Redis's used_memory as a share of its maxmemory, read at most every `every_s`; None without a
    maxmemory. An unreadable INFO keeps the last answer."""

    def __init__(self, redis: Redis, every_s: float) -> None:
        self.redis, self.every_s = redis, every_s
        self._share: float | None = None
        self._read_at = -math.inf

    def share(self) -> float | None:
        if time.monotonic() - self._read_at < self.every_s:
            return self._share
        self._read_at = time.monotonic()
        try:
            memory = redis_memory(self.redis)
        except (RedisError, KeyError, TypeError, ValueError) as e:
            log.warning("Redis's memory unreadable (%s): keeping the last reading", e)
            return self._share
        used, limit = memory["used_bytes"], memory["maxmemory_bytes"]
        self._share = used / limit if limit else None
        return self._share


class Backpressure:
    """Why `who` (a key of LATER) must wait now, or None."""

    def __init__(self, redis: Redis, settings: Settings, who: str) -> None:
        self.redis, self.settings, self.who = redis, settings, who
        self.memory = RedisMemory(redis, MEMORY_CHECK_S)
        self._later = [queue(redis, p, settings.namespace).key for p in pools(settings) if stage_of(p) in LATER[who]]

    def held(self) -> str | None:
        s = self.settings
        if self.who in ("enqueue", "inbox"):
            queued = backlog(self.redis, s) if self.who == "enqueue" else queue_lengths(self.redis, s)[0]
            if queued > s.max_backlog_jobs:
                return f"{queued} jobs queued > {s.max_backlog_jobs} (EMBEDPIPE_MAX_BACKLOG_JOBS)"
        share = self.memory.share()
        if share is not None and share >= s.hold_redis_share and self._later_queued():
            return (
                f"Redis at {share:.0%} of its maxmemory, past {s.hold_redis_share:.0%} "
                "(EMBEDPIPE_HOLD_REDIS_SHARE): the work in flight drains first"
            )
        return None

    def _later_queued(self) -> bool:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in self._later:
                pipe.llen(key)
            return any(pipe.execute())
