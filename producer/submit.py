"""Enqueue documents as load batches: one claim-check payload and one rq job per batch (the light client:
no workers, numpy or torch are imported here).

`batched`, `batched_by_size`, `new_batch_id`, `enqueue_batch` and `backlog` live in shared/ (the grouping
in shared/messages.py, the rq protocol in shared/queues.py) and are importable from here too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack
from redis import Redis

from shared.backpressure import Backpressure
from shared.errors import ConfigError
from shared.ledger import RedisLedger
from shared.messages import DeadLetter, PruneRequest, SourceDoc, batched, batched_by_size
from shared.queues import backlog, enqueue_batch, enqueue_jobs, new_batch_id, queue
from shared.settings import Settings

__all__ = [
    "SubmitResult",
    "backlog",
    "batched",
    "batched_by_size",
    "enqueue_batch",
    "new_batch_id",
    "push_to_inbox",
    "submit",
    "submit_prune",
    "wait_for_room",
]

BACKPRESSURE_POLL_S = 0.5
KEPT_SLICE = 10_000  # IDs per SADD of a prune's listing (~0.5 MB): no one command carries millions


@dataclass
class SubmitResult:
    batches: int = 0
    documents: int = 0
    rejected: int = 0
    rejected_letters: list[DeadLetter] = field(default_factory=list)  # what the client rejected itself
    batch_ids: list[str] = field(default_factory=list)  # the load batches enqueued (`embedpipe wait --batch`)


def wait_for_room(redis: Redis, settings: Settings, on_wait: Callable[[str], None] | None = None) -> None:
    """Backpressure (shared/backpressure.py): block while the backlog is over settings.max_backlog_jobs, or
    Redis is past settings.hold_redis_share of its maxmemory with work queued, rather than fill Redis;
    `on_wait` gets the reason."""
    pressure = Backpressure(redis, settings, "enqueue")
    while why := pressure.held():
        if on_wait:
            on_wait(why)
        time.sleep(BACKPRESSURE_POLL_S)


def submit(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    on_progress: Callable[[int], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    backfill_from: str = "",
) -> SubmitResult:
    """Enqueue sources in batches of settings.batch_docs; items the client already rejected
    (unreadable files, malformed JSONL lines) are recorded as dead letters. `backfill_from`: the
    collection the sources were read from (`reembed --enqueue`), so that a copy stale by the time it is
    chunked never overwrites a newer version."""
    ledger = RedisLedger(redis, settings.keys, settings.dead_source_ttl_s)
    batch_ids: list[str] = []

    def send(sources: list[SourceDoc], rejected: list[DeadLetter]) -> None:
        with redis.pipeline() as pipe:
            if sources:
                batch_ids.append(enqueue_batch(redis, settings, sources, pipe, backfill_from))
            ledger.add_dead(rejected, pipe=pipe)
            pipe.execute()

    result = _in_groups(redis, settings, items, send, on_progress, on_wait)
    result.batch_ids = batch_ids
    return result


def push_to_inbox(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    on_progress: Callable[[int], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Push sources onto the inbox list (msgpack messages, one round trip per group), for the janitor to
    batch: all a client with the `producer` Redis user may do. Items the client already rejected are
    returned, not recorded (recording dead letters takes more than that user may)."""

    def send(sources: list[SourceDoc], rejected: list[DeadLetter]) -> None:
        if sources:
            redis.rpush(settings.keys.INBOX, *[msgpack.packb(s.to_dict(), use_bin_type=True) for s in sources])

    return _in_groups(redis, settings, items, send, on_progress, on_wait)


def _in_groups(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    send: Callable[[list[SourceDoc], list[DeadLetter]], None],
    on_progress: Callable[[int], None] | None,
    on_wait: Callable[[str], None] | None,
) -> SubmitResult:
    """Hand `send` the items group by group (batch_docs and batch_bytes), under backpressure."""
    result = SubmitResult()
    for group in batched_by_size(items, settings.batch_docs, settings.batch_bytes):
        wait_for_room(redis, settings, on_wait)
        sources = [i for i in group if isinstance(i, SourceDoc)]
        rejected = [i for i in group if isinstance(i, DeadLetter)]
        send(sources, rejected)
        result.batches += bool(sources)
        result.documents += len(sources)
        result.rejected += len(rejected)
        result.rejected_letters += rejected
        if on_progress:
            on_progress(len(group))
    return result


def submit_prune(redis: Redis, settings: Settings, kept: set[str], scope: str = "", force: bool = False) -> str:
    """Ask the writers to delete every stored document under `scope` not in `kept` (a sync): one job on
    the write queue, the IDs in a Redis set (keys.kept_set) sent a slice at a time, the request (how many
    IDs, scope, the guard's share, --force-prune) in a claim-check payload. A prune the guard refuses
    becomes a dead letter `prune:<token>` with the numbers (`embedpipe failed`)."""
    if not kept and not force:
        raise ConfigError("--prune with no documents listed would empty the store: refused")
    token = uuid.uuid4().hex
    kept_set = settings.keys.kept_set(token)
    for piece in batched(kept, KEPT_SLICE):  # each with its expiry: a client that dies half-way leaks nothing
        redis.pipeline(transaction=False).sadd(kept_set, *piece).expire(kept_set, settings.payload_ttl_s).execute()
    request = PruneRequest([], scope, settings.prune_max_fraction, force, listed=len(kept))
    with redis.pipeline() as pipe:
        pipe.set(settings.keys.kept_ids(token), request.encode(), ex=settings.payload_ttl_s)
        enqueue_jobs(queue(redis, "write", settings.namespace), settings, "prune", [(token,)], pipe)
        pipe.execute()
    return token
