"""Write stage: chunks + vectors -> the store, then finalise each batch once all its parts are in.

Upserts are idempotent by chunk_id. Finalising a batch makes every document end in exactly one
place: a document whose chunks were all written has its stale chunks (from an earlier version)
deleted and its content hash recorded (an unchanged resubmission is then skipped), and counts as
done; a document with a chunk in a part that failed for good, or that the model refused (already a
dead letter), has all its chunks and its record removed from the store.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
from redis.exceptions import WatchError
from tenacity import retry, retry_if_not_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared import keys
from shared.errors import DecodeError
from shared.messages import BatchPlan, Chunk, Document, decode_chunks, decode_documents
from shared.metrics import COLLECTION_CHUNKS, DOCUMENTS, count_retry
from shared.store import OPTIMIZE_AFTER_DRAIN_WRITES, DocRecord, Store, prune
from shared.vectors import unpack_vectors
from workers.context import check_spec, context

log = logging.getLogger(__name__)

STAGE = "write"

# Store commits can conflict or time out under concurrent writers: retry them in place before
# failing the whole job (which rq then retries as a job).
store_retry = retry(
    retry=retry_if_not_exception_type((ValueError, TypeError, DecodeError)),
    wait=wait_random_exponential(multiplier=0.2, max=5),
    stop=stop_after_attempt(5) | stop_after_delay(60),
    before_sleep=count_retry(STAGE, "io"),
    reraise=True,
)


@store_retry
def write_batch(store: Store, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord] = ()) -> None:
    """Upsert chunks; documents in `complete` are replaced whole in the same write (see Store.upsert)."""
    store.upsert(chunks, vectors, complete)


def complete_in(chunks: list[Chunk], expected: dict[str, list[str]], docs: list[Document]) -> list[DocRecord]:
    """Records of the documents whose every chunk is among `chunks` (parts keep documents whole
    where they fit): those are replaced in the write itself, not at batch finalisation."""
    here: dict[str, set[str]] = {}
    for c in chunks:
        here.setdefault(c.doc_id, set()).add(c.chunk_id)
    whole = {d: ids for d, ids in expected.items() if here.get(d) == set(ids)}
    return doc_records(docs, whole)


@store_retry
def commit_documents(store: Store, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int:
    """Documents whose chunks are all written: stale chunks deleted, content hash recorded (so an
    unchanged resubmission is skipped). Failed documents: every chunk and record removed."""
    return store.commit_documents(done, expected, failed)


def export_collection(store: Store) -> None:
    """The collection's size for the dashboard; exact counts cost a scan, so only after a bulk load."""
    if store.collection:
        COLLECTION_CHUNKS.clear()  # a promotion elsewhere may have flipped `active`
        active = "1" if store.active() == store.collection else "0"
        COLLECTION_CHUNKS.labels(store.collection, active).set(store.count())


def doc_records(docs: list[Document], expected: dict[str, list[str]]) -> list[DocRecord]:
    return [DocRecord(d.id, d.content_hash, len(expected[d.id]), d.text, d.metadata) for d in docs if d.id in expected]


def write_job(batch_id: str, part: int) -> dict[str, int]:
    """rq job: store one part; the writer that completes a batch finalises it."""
    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    check_spec(ctx, batch_id)
    chunks = decode_chunks(ctx.redis.get(keys.chunks(batch_id, part)))
    vectors = unpack_vectors(ctx.redis.get(keys.vectors(batch_id, part)), len(chunks), ctx.spec.vector_dtype)
    refused = {m.decode() for m in ctx.redis.smembers(keys.docs_failed(batch_id))}  # dead letters already
    keep = [i for i, c in enumerate(chunks) if c.doc_id not in refused]
    docs = decode_documents(ctx.redis.get(keys.documents(batch_id)))
    metadata = {d.id: d.metadata for d in docs}  # chunks travel without it (workers/chunk.py)
    kept = [replace(chunks[i], metadata=metadata.get(chunks[i].doc_id, {})) for i in keep]
    complete = complete_in(kept, BatchPlan.from_hash(ctx.redis.hgetall(keys.batch_plan(batch_id))).chunks, docs)
    write_batch(ctx.store, kept, vectors[keep], complete)
    with ctx.redis.pipeline() as pipe:
        if complete:
            pipe.sadd(keys.docs_committed(batch_id), *[d.doc_id for d in complete])
            pipe.expire(keys.docs_committed(batch_id), ctx.settings.payload_ttl_s)
        pipe.sadd(keys.parts_written(batch_id), part)
        pipe.expire(keys.parts_written(batch_id), ctx.settings.payload_ttl_s)
        ctx.ledger.incr(pipe=pipe, chunks_written=len(chunks))
        pipe.execute()
    log.info("write %s/%d: %d chunks", batch_id, part, len(chunks))
    if batch_accounted(ctx.redis, batch_id):
        finalize(batch_id)
    return {"chunks": len(chunks)}


def prune_job(token: str) -> dict[str, int]:
    """rq job (write queue): a sync removes the documents its sources no longer list, everywhere."""
    ctx = context()
    raw = ctx.redis.get(keys.kept_ids(token))
    try:
        kept = msgpack.unpackb(raw) if raw is not None else None
    except Exception as e:
        raise DecodeError(f"prune {token}: the kept IDs are not valid msgpack: {e}") from e
    if not isinstance(kept, list) or not all(isinstance(i, str) for i in kept):
        raise DecodeError(f"prune {token}: the kept IDs are missing or not a list of strings")
    removed = prune(ctx.settings.store, set(kept))
    ctx.redis.delete(keys.kept_ids(token))
    log.info("prune %s: removed %s", token, removed)
    return removed


def batch_accounted(redis: object, batch_id: str) -> bool:
    """Every part of the batch is either written or failed for good."""
    pipe = redis.pipeline()  # type: ignore[attr-defined]
    pipe.scard(keys.parts_written(batch_id))
    pipe.scard(keys.parts_failed(batch_id))
    pipe.hget(keys.batch_plan(batch_id), "parts")
    written, failed, parts = pipe.execute()
    return parts is not None and written + failed >= int(parts)


def finalize_job(batch_id: str) -> None:
    """rq job (write queue), enqueued by the janitor when a batch's last open part failed for good."""
    if not context().batch_finalized(batch_id):
        finalize(batch_id)


def _load_drained(ctx: object) -> bool:
    """No embed or write work is waiting: a bulk load has just ended."""
    queues = ctx.queues  # type: ignore[attr-defined]
    return queues["embed"].count == 0 and queues["write"].count == 0


def _mark_finalized(ctx: Any, batch_id: str, done: dict[str, list[str]], parts: int) -> bool:
    """Mark the batch finalized, clear its documents' old dead letters, count them done and drop its
    payloads in one transaction, once: False if another writer did (a writer killed half-way through
    used to leave the mark set and the counters and dead letters as they were)."""
    final = keys.batch_finalized(batch_id)
    with ctx.redis.pipeline() as pipe:
        try:
            pipe.watch(final)
            if pipe.exists(final):
                return False
            pipe.multi()
            pipe.set(final, 1, ex=ctx.settings.payload_ttl_s)
            ctx.ledger.clear_dead(done, pipe=pipe)
            ctx.ledger.incr(pipe=pipe, documents_done=len(done))
            pipe.delete(*keys.batch_keys(batch_id, parts))
            pipe.execute()
            return True
        except WatchError:  # another writer finalized it at the same moment
            return False


def finalize(batch_id: str) -> None:
    ctx = context()
    plan = BatchPlan.from_hash(ctx.redis.hgetall(keys.batch_plan(batch_id)))
    expected = plan.chunks
    failed = {m.decode() for m in ctx.redis.smembers(keys.docs_failed(batch_id))}
    committed = {m.decode() for m in ctx.redis.smembers(keys.docs_committed(batch_id))}
    for part in ctx.redis.smembers(keys.parts_failed(batch_id)):
        failed |= {c.doc_id for c in decode_chunks(ctx.redis.get(keys.chunks(batch_id, int(part))))}
    done = {doc: ids for doc, ids in expected.items() if doc not in failed}
    docs = decode_documents(ctx.redis.get(keys.documents(batch_id)))
    rest = {doc: ids for doc, ids in done.items() if doc not in committed}  # spread over several parts
    stale = commit_documents(ctx.store, doc_records(docs, rest), rest, sorted(failed))
    if _mark_finalized(ctx, batch_id, done, plan.parts):
        DOCUMENTS.labels(STAGE, "ok").inc(len(done))
    if _load_drained(ctx):  # after a bulk load: build the pgvector index, compact LanceDB
        store_retry(ctx.store.optimize)(OPTIMIZE_AFTER_DRAIN_WRITES)
        export_collection(ctx.store)
    log.info(
        "batch %s done: %d documents stored, %d failed, %d chunks deleted", batch_id, len(done), len(failed), stale
    )
