"""The rq protocol, in one place: how to reach Redis, the queues, which function a job of each stage
names and with which arguments, job IDs, enqueueing, the backlog and the pipeline's state.

Producers, workers and the janitor all speak it; none of it runs a stage (the job functions are named
here as strings, the way rq stores them: importing this module imports no stage).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import msgpack
from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.client import Pipeline
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry, Worker
from rq.serializers import JSONSerializer

from shared.keys import Keyspace
from shared.lanes import lanes
from shared.ledger import RedisLedger
from shared.messages import SourceDoc, pack
from shared.metrics import RETRIES
from shared.settings import STAGES, Settings

log = logging.getLogger(__name__)

JOB_FUNCTIONS = {
    "load": "workers.load.load_job",
    "chunk": "workers.chunk.chunk_job",
    "embed": "workers.embed.embed_job",
    "write": "workers.write.write_job",
    "finalize": "workers.write.finalize_job",  # runs on the write queue: it needs the store
    "prune": "workers.write.prune_job",  # write queue: the store
    "probe": "workers.probe.probe_job",  # runs on the embed queue: it needs the model
}
QUEUE_OF = {"finalize": "write", "prune": "write", "probe": "embed"}
# What each stage function takes: a job whose arguments do not match is refused, like a foreign function.
ARGUMENTS: dict[str, tuple[type, ...]] = {
    "load": (str,),
    "chunk": (str,),
    "embed": (str, int),
    "write": (str, int),
    "finalize": (str,),
    "prune": (str,),
    "probe": (str, int),
}
MAX_ARGUMENT_CHARS = 4096
ALLOWED = {stage: {f for s, f in JOB_FUNCTIONS.items() if QUEUE_OF.get(s, s) == stage} for stage in STAGES}
RETRY_INTERVALS_S = [5, 30, 120]
RESULT_TTL_S = 3600


def connect(
    settings: Settings, retries: int = 6, timeout_s: float | None = None, connect_timeout_s: float | None = None
) -> Redis:
    """A Redis client that retries transient connection errors with backoff (~25 s in all), saying so
    in the log; the password comes from the environment (EMBEDPIPE_REDIS_PASSWORD[_FILE]) or the URL
    in EMBEDPIPE_REDIS_URL, and is never logged. With `timeout_s`, every connect and read gives up
    after that long (not for a client that dequeues: its reads block); `connect_timeout_s`, if given,
    bounds connecting instead."""
    where = settings.redis_url_redacted

    class LoggedRetry(RedisRetry):
        def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
            def logged_fail(error: Exception, *rest: Any) -> Any:
                log.warning("Redis at %s: %s; retrying with backoff", where, error)
                RETRIES.labels("redis", "redis").inc()
                return fail(error, *rest)

            return super().call_with_retry(do, logged_fail, *args, **kwargs)

    kwargs: dict[str, Any] = {
        "retry": LoggedRetry(ExponentialBackoff(cap=10, base=0.5), retries) if retries else RedisRetry(NoBackoff(), 0),
        "retry_on_error": [ConnectionError, TimeoutError],
        "health_check_interval": 30,
        "socket_connect_timeout": connect_timeout_s or timeout_s or 10,
    }
    if timeout_s:
        kwargs["socket_timeout"] = timeout_s
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    return Redis.from_url(settings.redis_url, **kwargs)


def queue_name(pool: str, namespace: str) -> str:
    """The rq queue of a pool: its name (load, chunk, embed, embed@LANE, write), or NAMESPACE:pool
    (rq's key rq:queue:NAMESPACE:pool), so `rq info` and rq-dashboard show each namespace's queues."""
    return f"{namespace}:{pool}" if namespace else pool


def embed_pool(lane: str) -> str:
    """The embed pool of a lane (shared/lanes.py): `embed` in a one-model deployment, else embed@LANE."""
    return f"embed@{lane}" if lane else "embed"


def pools(settings: Settings) -> list[str]:
    """The pipeline's pools, each with its own rq queue: the four stages, with one embed pool per lane
    when several models run at once (EMBEDPIPE_MODELS)."""
    return ["load", "chunk", *(embed_pool(lane.name) for lane in lanes(settings)), "write"]


CLEAN_LOCK_S = 30  # a queue's maintenance lock; rq's own lives 899 s


class StageQueue(Queue):
    """rq's Queue, with a short maintenance lock. Whoever cleans a queue's registries (the janitor every few
    seconds, a worker when it starts) holds the lock while it works; one SIGKILLed meanwhile left rq's
    899-s lock behind, and nobody handed back that queue's abandoned jobs for 15 minutes (a CI hang). A
    round of cleaning takes well under a second (up to ~0.1 s a queue at 1M documents); should one
    outlast the lock, a second cleaner may hand the same expired job back again: a redelivery, which
    every stage already tolerates (deterministic job IDs, idempotent writes)."""

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=CLEAN_LOCK_S))


def queue(redis: Redis, stage: str, namespace: str) -> Queue:
    return StageQueue(queue_name(stage, namespace), connection=redis, serializer=JSONSerializer)


def stage_of(queue_name: str) -> str:
    """The stage of a queue name (queue_name's inverse, less the lane)."""
    return queue_name.rpartition(":")[2].partition("@")[0]


def job_id(stage: str, args: tuple[Any, ...], namespace: str) -> str:
    """Deterministic: a redelivered job enqueues the same next job, not a second one. rq's job keys are
    not per queue, so a namespace's job IDs start with it."""
    parts = [namespace] if namespace else []
    return re.sub(r"[^A-Za-z0-9_-]", "-", "_".join([*parts, stage, *map(str, args)]))  # what rq allows


def enqueue_jobs(
    q: Queue,
    settings: Settings,
    stage: str,
    args_list: list[tuple[Any, ...]],
    pipe: Pipeline,
    tokens: list[int] | None = None,
    timeout_s: int | None = None,
) -> None:
    """One pipeline round trip for all jobs; `tokens` (per job) sizes embed timeouts."""
    retry = Retry(max=settings.job_retries, interval=RETRY_INTERVALS_S) if settings.job_retries else None
    timeout_stage = QUEUE_OF.get(stage, stage)
    q.enqueue_many(
        [
            Queue.prepare_data(
                JOB_FUNCTIONS[stage],
                args=args,
                job_id=job_id(stage, args, settings.namespace),
                timeout=timeout_s or settings.job_timeout_s(timeout_stage, tokens[i] if tokens else 0),
                result_ttl=RESULT_TTL_S,
                failure_ttl=settings.payload_ttl_s,
                retry=retry,
            )
            for i, args in enumerate(args_list)
        ],
        pipeline=pipe,
    )


def new_batch_id() -> str:
    """Time-ordered and unique; downstream job IDs derive from it deterministically."""
    return f"{time.time_ns() // 1_000_000:x}-{os.urandom(4).hex()}"


def enqueue_batch(
    redis: Redis, settings: Settings, sources: list[SourceDoc], pipe: Pipeline, backfill_from: str = ""
) -> str:
    """Add one batch (payload + load job) to `pipe`; the caller executes it. `backfill_from`: the collection
    the sources' texts were read from (a backfill: see Keyspace.batch_backfill)."""
    batch_id, ks = new_batch_id(), settings.keys
    pipe.set(ks.sources(batch_id), pack([s.to_dict() for s in sources]), ex=settings.payload_ttl_s)
    if backfill_from:
        pipe.set(ks.batch_backfill(batch_id), backfill_from, ex=settings.payload_ttl_s)
    ids = msgpack.packb([s.id for s in sources])
    pipe.set(ks.batch_doc_ids(batch_id), ids, ex=max(settings.payload_ttl_s, settings.dead_source_ttl_s))
    enqueue_jobs(queue(redis, "load", settings.namespace), settings, "load", [(batch_id,)], pipe)
    return batch_id


def queue_lengths(redis: Redis, settings: Settings) -> tuple[int, int]:
    """Jobs queued in all the stage queues, and messages in the inbox (of settings.namespace): one round trip."""
    pipe = redis.pipeline(transaction=False)
    for pool in pools(settings):
        pipe.llen(queue(redis, pool, settings.namespace).key)
    pipe.llen(settings.keys.INBOX)
    *queued, inbox = pipe.execute()
    return sum(queued), inbox


def backlog(redis: Redis, settings: Settings) -> int:
    """Jobs waiting in the pipeline, counting a full inbox batch as one job."""
    queued, inbox = queue_lengths(redis, settings)
    return queued + inbox // settings.batch_docs


def distributed_status(redis: Redis, settings: Settings) -> dict[str, Any]:
    """What the pipeline (of settings.namespace) is doing: per-pool job counts and workers, documents done
    (by every model) and failed; with several models, each model's own counts (`models`)."""
    ks = settings.keys
    stages = {}
    for stage in pools(settings):
        q = queue(redis, stage, ks.namespace)
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
    ledger = RedisLedger(redis, ks)  # read-only here
    counters = ledger.counters()
    return {
        "mode": "distributed",
        "inbox": int(redis.llen(ks.INBOX)) + inbox_held(redis, ks),
        "stages": stages,
        "documents_done": counters.get("documents_done", 0),
        "documents_failed": ledger.dead_count(),
        "chunks_written": counters.get("chunks_written", 0),
        "models": {
            lane.entry: {"pool": embed_pool(lane.name), **ledger.lane_counters(lane.name)}
            for lane in lanes(settings)
            if lane.name
        },
        "probe": ledger.last_probe(),
        "redis": redis_memory(redis),
    }


def redis_memory(redis: Redis) -> dict[str, int]:
    """Redis's used_memory and maxmemory (0: none), in bytes: what EMBEDPIPE_HOLD_REDIS_SHARE is a share of."""
    info = redis.info("memory")
    return {"used_bytes": int(info["used_memory"]), "maxmemory_bytes": int(info.get("maxmemory", 0))}


def inbox_held(redis: Redis, ks: Keyspace) -> int:
    """Messages a janitor took from the inbox and has not enqueued yet (workers/inbox.py)."""
    takers = [m.decode() for m in redis.smembers(ks.INBOX_TAKERS)]
    with redis.pipeline(transaction=False) as pipe:
        for taker in takers:
            pipe.llen(ks.inbox_taken(taker))
        return sum(pipe.execute()) if takers else 0


def is_idle(status: dict[str, Any]) -> bool:
    """Nothing waiting, running or scheduled for retry anywhere (failed jobs do not count)."""
    busy = ("queued", "dequeuing", "running", "scheduled", "deferred")
    return status["inbox"] == 0 and all(s[k] == 0 for s in status["stages"].values() for k in busy)


def wait_until_idle(
    redis: Redis,
    settings: Settings,
    timeout_s: float = 0,
    poll_s: float = 0.2,
    done: Callable[[], bool] = lambda: False,
) -> bool:
    """Block until `done()` or the pipeline is idle twice in a row, `poll_s` apart (a job between two
    stages is never missed); False if `timeout_s` (0: never) passed first."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    idle_rounds = 0
    while True:
        if done():
            return True
        idle_rounds = idle_rounds + 1 if is_idle(distributed_status(redis, settings)) else 0
        if idle_rounds == 2:
            return True
        if deadline and time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
