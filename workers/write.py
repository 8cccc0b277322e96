"""Write stage: chunks + vectors -> the store, then finalise each batch once all its parts are in.

Upserts are idempotent by chunk_id. `write_part` and `finalize_batch` are the stage's batch functions,
the same in both runtimes (the bookkeeping is workers/batch.py's); the rq jobs are thin. Finalising a
batch makes every document end in exactly one place: a document whose chunks were all written has its
stale chunks (from an earlier version) deleted and its content hash recorded (an unchanged resubmission
is then skipped), and counts as done; a document with a chunk in a part that failed for good, or that the
model refused (already a dead letter), has all its chunks and its record removed from the store.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace

import numpy as np
import numpy.typing as npt
from tenacity import retry, retry_if_not_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.errors import DecodeError, PruneRefused
from shared.messages import Chunk, DeadLetter, Document, PruneRequest
from shared.metrics import COLLECTION_CHUNKS, count_retry
from shared.store import OPTIMIZE_AFTER_DRAIN_WRITES, DocRecord, KeptIds, Store, prune
from workers.batch import BatchState, Outcome, completed_by, doc_records, kept_rows, outcome
from workers.batch_redis import RedisBatch
from workers.context import JobReport, WorkerContext, stage_job

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
def write_batch(store: Store, chunks: list[Chunk], vectors: np.ndarray, complete: list[DocRecord]) -> None:
    """Upsert chunks; documents in `complete` are replaced whole in the same write (see Store.upsert)."""
    store.upsert(chunks, vectors, complete)


@store_retry
def commit_documents(store: Store, done: list[DocRecord], expected: dict[str, list[str]], failed: list[str]) -> int:
    """Documents whose chunks are all written: stale chunks deleted, content hash recorded (so an
    unchanged resubmission is skipped). Failed documents: every chunk and record removed."""
    return store.commit_documents(done, expected, failed)


def with_metadata(chunks: list[Chunk], docs: list[Document]) -> list[Chunk]:
    """Chunks that travelled without their document's metadata (workers/chunk.py) get it back."""
    metadata = {d.id: d.metadata for d in docs}
    return [replace(c, metadata=metadata[c.doc_id]) if not c.metadata and metadata.get(c.doc_id) else c for c in chunks]


def write_part(
    state: BatchState, store: Store, part: int, chunks: list[Chunk], vectors: npt.NDArray[np.float32]
) -> None:
    """Store one embedded part: every chunk but those of documents the model refused; the documents it
    holds whole are replaced in this same write (stale chunks deleted, records written)."""
    docs, expected = state.documents(), state.plan().chunks
    rows = kept_rows(chunks, state.refused())
    kept = with_metadata([chunks[i] for i in rows], docs)
    whole = completed_by(kept, expected)
    write_batch(store, kept, vectors[rows], doc_records(docs, {d: expected[d] for d in whole}))
    state.record_part(part, whole)


def finalize_batch(state: BatchState, store: Store) -> Outcome | None:
    """Once every part is written or failed for good: documents spread over several parts get their stale
    chunks deleted and their records written, failed documents lose every chunk and record; then the
    batch is marked finalised and counted, once. The outcome, or None if another writer finalised it."""
    if state.finalized():  # a redelivery
        return None
    result = outcome(state.snapshot())
    rest = result.uncommitted
    stale = commit_documents(store, doc_records(state.documents(), rest), rest, result.failed)
    log.debug("%d stale chunks deleted", stale)
    return result if state.mark_finalized(result) else None


@stage_job(STAGE)
def write_job(ctx: WorkerContext, batch: RedisBatch, part: int) -> JobReport:
    """rq job: store one part; the writer that completes a batch finalises it."""
    chunks = batch.chunks(part)
    write_part(batch, ctx.store, part, chunks, batch.vectors(part, len(chunks), ctx.spec.vector_dtype))
    done = _finalize(ctx, batch) if batch.accounted() else None
    return {"chunks": len(chunks), "documents_ok": len(done.done) if done else 0}


@stage_job(STAGE, check_spec=False)
def finalize_job(ctx: WorkerContext, batch: RedisBatch) -> JobReport:
    """rq job (write queue), enqueued by the janitor when a batch's last open part failed for good."""
    done = _finalize(ctx, batch)
    return {"documents_ok": len(done.done) if done else 0}


def _finalize(ctx: WorkerContext, batch: RedisBatch) -> Outcome | None:
    result = finalize_batch(batch, ctx.store)
    if result is not None:
        log.info("batch %s done: %d documents stored, %d failed", batch.id, len(result.done), len(result.failed))
    if load_drained(ctx):  # after a bulk load: build the pgvector index, compact LanceDB
        store_retry(ctx.store.optimize)(OPTIMIZE_AFTER_DRAIN_WRITES)
        export_collection(ctx.store)
    return result


def load_drained(ctx: WorkerContext) -> bool:
    """Nothing waits anywhere: the inbox and every stage's queue are empty, a bulk load has ended. (The
    embed and write queues alone empty mid-load behind a fast embedder: pgvector then got its HNSW index
    early and every later part paid its insertion, 5-10x slower: bench/README.md, scale.py on pgvector.)"""
    queues_empty = all(q.count == 0 for q in ctx.queues.values())
    return queues_empty and ctx.redis.llen(ctx.settings.keys.INBOX) == 0


def export_collection(store: Store) -> None:
    """The collection's size for the dashboard; exact counts cost a scan, so only after a bulk load."""
    if store.collection:
        COLLECTION_CHUNKS.clear()  # a promotion elsewhere may have flipped `active`
        active = "1" if store.active() == store.collection else "0"
        COLLECTION_CHUNKS.labels(store.collection, active).set(store.count())


def _listing(ctx: WorkerContext, token: str, request: PruneRequest) -> Collection[str] | KeptIds:
    """What the sync lists: the Redis set, asked a slice at a time (PruneRefused if it is not all there:
    expired or not written whole, every missing ID would look deleted), or an older client's inline IDs."""
    if request.listed is None:
        return set(request.kept)
    key = ctx.settings.keys.kept_set(token)
    ctx.redis.expire(key, ctx.settings.payload_ttl_s)  # it must not expire half-way through the prune
    if (found := ctx.redis.scard(key)) != request.listed:
        raise PruneRefused(
            f"prune refused: its listing holds {found} of the {request.listed} IDs the client sent (expired "
            "or cut short); nothing deleted: run the sync again"
        )
    return lambda ids: [bool(x) for x in ctx.redis.smismember(key, ids)]


def prune_job(ctx: WorkerContext, token: str) -> dict[str, int]:
    """rq job (write queue): a sync removes the documents its sources no longer list, everywhere (under
    its scope). A prune the guard refuses is a dead letter `prune:<token>` with the numbers, not retried.
    The listing stays in Redis (keys.kept_set), asked about the store's IDs a slice at a time."""
    keys = ctx.settings.keys
    request = PruneRequest.decode(ctx.redis.get(keys.kept_ids(token)))
    try:
        removed = prune(
            ctx.settings.store,
            _listing(ctx, token, request),
            listed=request.listed,
            scope=request.scope,
            max_fraction=request.max_fraction,
            force=request.force,
        )
    except PruneRefused as e:
        log.warning("prune %s: %s", token, e)
        ctx.ledger.add_dead([DeadLetter(f"prune:{token}", STAGE, "job_failed", str(e))])
        removed = {"refused": 1}
    ctx.redis.delete(keys.kept_ids(token), keys.kept_set(token))
    log.info("prune %s: removed %s", token, removed)
    return removed
