"""Enqueue documents as load batches: one claim-check payload and one rq job per batch."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import msgpack
from redis import Redis

from shared import keys
from shared.errors import ConfigError
from shared.ledger import RedisLedger
from shared.messages import DeadLetter, SourceDoc, pack
from shared.settings import STAGES, Settings

BACKPRESSURE_POLL_S = 0.5


def batched(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    """itertools.batched, which Python 3.11 lacks."""
    it = iter(items)
    while group := list(islice(it, n)):
        yield group


def batched_by_size(items: Iterable[Any], n: int, max_bytes: int) -> Iterable[list[Any]]:
    """Groups of at most n items and about max_bytes of document bodies (at least one item each)."""
    group: list[Any] = []
    size = 0
    for item in items:
        body = getattr(item, "text", None) or getattr(item, "content", None) or b""
        if group and (len(group) == n or size + len(body) > max_bytes):
            yield group
            group, size = [], 0
        group.append(item)
        size += len(body)
    if group:
        yield group


def new_batch_id() -> str:
    """Time-ordered and unique; downstream job IDs derive from it deterministically."""
    return f"{time.time_ns() // 1_000_000:x}-{os.urandom(4).hex()}"


def enqueue_batch(redis: Redis, settings: Settings, sources: list[SourceDoc], pipe: Any) -> str:
    """Add one batch (payload + load job) to `pipe`; the caller executes it."""
    from workers.runtime import enqueue_jobs, queue

    batch_id = new_batch_id()
    pipe.set(keys.sources(batch_id), pack([s.to_dict() for s in sources]), ex=settings.payload_ttl_s)
    ids = msgpack.packb([s.id for s in sources])
    pipe.set(keys.batch_doc_ids(batch_id), ids, ex=max(settings.payload_ttl_s, settings.dead_source_ttl_s))
    enqueue_jobs(queue(redis, "load"), settings, "load", [(batch_id,)], pipe)
    return batch_id


@dataclass
class SubmitResult:
    batches: int = 0
    documents: int = 0
    rejected: int = 0
    rejected_letters: list[DeadLetter] = field(default_factory=list)  # what the client rejected itself


def backlog(redis: Redis, settings: Settings) -> int:
    """Jobs waiting in the pipeline, counting a full inbox batch as one job."""
    from workers.runtime import queue

    pipe = redis.pipeline(transaction=False)
    for stage in STAGES:
        pipe.llen(queue(redis, stage).key)
    pipe.llen(keys.INBOX)
    *queued, inbox = pipe.execute()
    return sum(queued) + inbox // settings.batch_docs


def wait_for_room(redis: Redis, settings: Settings, on_wait: Callable[[int], None] | None = None) -> None:
    """Backpressure: block while the backlog is over settings.max_backlog_jobs, rather than fill Redis."""
    while (waiting := backlog(redis, settings)) > settings.max_backlog_jobs:
        if on_wait:
            on_wait(waiting)
        time.sleep(BACKPRESSURE_POLL_S)


def submit(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    on_progress: Callable[[int], None] | None = None,
    on_wait: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Enqueue sources in batches of settings.batch_docs; items the client already rejected
    (unreadable files, malformed JSONL lines) are recorded as dead letters."""
    ledger = RedisLedger(redis, settings.dead_source_ttl_s)

    def send(sources: list[SourceDoc], rejected: list[DeadLetter]) -> None:
        with redis.pipeline() as pipe:
            if sources:
                enqueue_batch(redis, settings, sources, pipe)
            ledger.add_dead(rejected, pipe=pipe)
            pipe.execute()

    return _in_groups(redis, settings, items, send, on_progress, on_wait)


def push_to_inbox(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    on_progress: Callable[[int], None] | None = None,
    on_wait: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Push sources onto the inbox list (msgpack messages, one round trip per group), for the janitor to
    batch: all a client with the `producer` Redis user may do. Items the client already rejected are
    returned, not recorded (recording dead letters takes more than that user may)."""

    def send(sources: list[SourceDoc], rejected: list[DeadLetter]) -> None:
        if sources:
            redis.rpush(keys.INBOX, *[msgpack.packb(s.to_dict(), use_bin_type=True) for s in sources])

    return _in_groups(redis, settings, items, send, on_progress, on_wait)


def _in_groups(
    redis: Redis,
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    send: Callable[[list[SourceDoc], list[DeadLetter]], None],
    on_progress: Callable[[int], None] | None,
    on_wait: Callable[[int], None] | None,
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


def submit_prune(redis: Redis, settings: Settings, kept: set[str]) -> str:
    """Ask the writers to delete every stored document not in `kept` (a sync): one job on the write
    queue, the IDs in a claim-check payload."""
    import uuid

    import msgpack

    from workers.runtime import enqueue_jobs, queue

    if not kept:
        raise ConfigError("--prune with no documents listed would empty the store: refused")
    token = uuid.uuid4().hex
    with redis.pipeline() as pipe:
        pipe.set(keys.kept_ids(token), msgpack.packb(sorted(kept)), ex=settings.payload_ttl_s)
        enqueue_jobs(queue(redis, "write"), settings, "prune", [(token,)], pipe)
        pipe.execute()
    return token
