"""The light client: submit documents to the distributed pipeline and follow them, from Python or through
`embedpipe enqueue`, `status`, `wait`, `failed` and `redrive`. It imports no stage, torch, numpy or
lancedb (an import-linter contract in pyproject.toml keeps it so), so any service can embed it.

    from producer.client import connect, failed, ledger_of, submit, wait
    from shared.messages import SourceDoc
    from shared.settings import Settings

    settings = Settings.from_env()
    redis = connect(settings)
    submit(redis, settings, [SourceDoc("doc-1", text="Green tea is steeped at 80 °C.")])
    wait(redis)
    print(failed(ledger_of(redis, settings)))

`status`, `failed` and `redrive` also read the embedded mode's ledger beside a local store.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
from redis import Redis

from producer.status import local_status
from producer.submit import SubmitResult, push_to_inbox, submit, submit_prune
from shared.errors import ConfigError, DecodeError
from shared.keys import Keyspace
from shared.ledger import Ledger, LocalLedger, RedisLedger, local_ledger_path
from shared.messages import DeadLetter, SourceDoc, decode_dead_letter
from shared.queues import connect, distributed_status, wait_until_idle
from shared.settings import Settings

__all__ = [
    "SubmitResult",
    "connect",
    "failed",
    "ledger_of",
    "local_ledger",
    "local_status",
    "push_to_inbox",
    "redrive",
    "redrive_sources",
    "status",
    "submit",
    "submit_prune",
    "unsettled",
    "wait",
    "wait_for_batches",
]


def status(redis: Redis, settings: Settings) -> dict[str, Any]:
    """Per stage: queued, running, scheduled and failed jobs and live workers; documents done and failed
    (of the pipeline of settings.namespace)."""
    return distributed_status(redis, settings)


def wait(redis: Redis, settings: Settings, timeout_s: float = 0) -> bool:
    """Block until the pipeline (of settings.namespace) is idle (inbox and queues empty, nothing running
    or scheduled for retry); False if `timeout_s` (0: never) passed first."""
    return wait_until_idle(redis, settings, timeout_s)


def unsettled(redis: Redis, keyspace: Keyspace, batch_ids: list[str]) -> list[str]:
    """The batches not settled yet: settled is finalised by a writer, or every document of it a dead
    letter since it was enqueued (its load or chunk job failed for good). ConfigError for a batch
    Redis knows nothing of (never enqueued, or its record expired)."""
    left = []
    for batch_id in batch_ids:
        with redis.pipeline(transaction=False) as pipe:
            pipe.exists(keyspace.batch_finalized(batch_id))
            pipe.get(keyspace.batch_doc_ids(batch_id))
            pipe.exists(keyspace.batch_lanes(batch_id))
            final, raw_ids, fanned_out = pipe.execute()
        if final:
            continue
        if fanned_out:  # several models: the last model's finalisation settles it, whatever failed before
            left.append(batch_id)
            continue
        if raw_ids is None:
            raise ConfigError(f"no batch {batch_id} in Redis: never enqueued, or its record expired")
        try:
            doc_ids = [str(i) for i in msgpack.unpackb(raw_ids)]
            enqueued_at = int(batch_id.split("-")[0], 16) / 1000
            raw_letters: list[Any] = redis.hmget(keyspace.DEAD, doc_ids) if doc_ids else []
            letters = [decode_dead_letter(v) if isinstance(v, bytes) else None for v in raw_letters]
        except (ValueError, TypeError, DecodeError, msgpack.UnpackException) as e:  # nothing read from Redis is trusted
            raise ConfigError(f"batch {batch_id}: unreadable record in Redis ({e})") from e
        if not all(d is not None and d.at >= enqueued_at - 1 for d in letters):
            left.append(batch_id)
    return left


def wait_for_batches(
    redis: Redis, settings: Settings, batch_ids: list[str], timeout_s: float = 0, poll_s: float = 0.2
) -> bool:
    """Block until every batch is settled (see `unsettled`), or the whole pipeline is idle (twice in a row);
    False if `timeout_s` (0: never) passed first."""
    return wait_until_idle(
        redis, settings, timeout_s, poll_s, done=lambda: not unsettled(redis, settings.keys, batch_ids)
    )


def ledger_of(redis: Redis, settings: Settings) -> RedisLedger:
    """The distributed mode's dead letters and counters."""
    return RedisLedger(redis, settings.keys, settings.dead_source_ttl_s)


def local_ledger(settings: Settings) -> LocalLedger | None:
    """The embedded mode's dead letters and counters (beside a directory store); None where no run wrote any."""
    path = local_ledger_path(settings.local_state_dir)
    return LocalLedger(path) if path.is_file() else None


def failed(
    ledger: Ledger,
    stage: str | None = None,
    reason: str | None = None,
    ids: tuple[str, ...] = (),
    limit: int | None = None,
    offset: int = 0,
) -> list[DeadLetter]:
    """Dead letters, oldest first, optionally only those of a stage, a reason or some documents. With
    `limit`, only the newest `limit` of those (after skipping the `offset` newest), read newest first
    without reading the rest: a listing stays quick with 100,000 dead letters."""
    wanted = set(ids)
    matching = (
        d
        for d in ledger.newest_dead()
        if (stage is None or d.stage == stage)
        and (reason is None or d.reason == reason)
        and (not ids or d.doc_id in wanted)
    )
    page = list(itertools.islice(matching, offset, None if limit is None else offset + limit))
    return page[::-1]


def redrive_sources(ledger: Ledger, letters: list[DeadLetter]) -> tuple[list[SourceDoc], list[str]]:
    """The documents the dead letters kept, ready to submit again, and the IDs of those that kept none
    (larger than the kept size, or expired: they must be resubmitted from where they came from)."""
    sources, without = [], []
    for letter in letters:
        try:
            sources.append(SourceDoc.from_dict(ledger.source(letter.doc_id)))
        except DecodeError:
            without.append(letter.doc_id)
    return sources, without


def redrive(
    redis: Redis, settings: Settings, stage: str | None = None, reason: str | None = None, ids: tuple[str, ...] = ()
) -> tuple[SubmitResult, list[str]]:
    """Submit dead letters again from the documents they kept; a document that succeeds leaves the dead
    letters. Returns what was submitted and the IDs that kept no document."""
    ledger = ledger_of(redis, settings)
    sources, without = redrive_sources(ledger, failed(ledger, stage, reason, ids))
    return submit(redis, settings, sources), without
