"""Write stage: chunks + vectors -> the store, then finalise each batch once all its parts are in.

Upserts are idempotent by chunk_id. Finalising a batch deletes each document's stale chunks (those
of an earlier version of the document), clears earlier dead letters of its documents, and counts them.
"""

from __future__ import annotations

import logging

import numpy as np

from shared.errors import DecodeError
from shared.messages import Chunk
from shared.store import Store

log = logging.getLogger(__name__)

STAGE = "write"


def write_batch(store: Store, chunks: list[Chunk], vectors: np.ndarray) -> None:
    store.upsert(chunks, vectors)


def delete_stale(store: Store, expected: dict[str, list[str]]) -> int:
    """Delete stored chunks of these documents that are not in their current chunk list."""
    stored = store.chunk_ids(list(expected))
    stale = [cid for doc_id, ids in stored.items() for cid in ids - set(expected[doc_id])]
    store.delete_chunks(stale)
    return len(stale)


def decode_vectors(raw: bytes | None, rows: int) -> np.ndarray:
    if raw is None:
        raise DecodeError("vectors payload is missing (expired or never written)")
    if rows == 0 or len(raw) % (4 * rows):
        raise DecodeError(f"vectors payload of {len(raw)} bytes does not hold {rows} float32 rows")
    vectors = np.frombuffer(raw, dtype=np.float32).reshape(rows, -1)
    if not np.isfinite(vectors).all():
        raise DecodeError("vectors payload holds non-finite numbers")
    return vectors


def write_job(batch_id: str, part: int) -> dict[str, int]:
    """rq job: store one part; the writer that completes a batch finalises it."""
    from shared import keys
    from shared.messages import decode_chunks
    from workers.runtime import context

    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    chunks = decode_chunks(ctx.redis.get(keys.chunks(batch_id, part)))
    vectors = decode_vectors(ctx.redis.get(keys.vectors(batch_id, part)), len(chunks))
    write_batch(ctx.store, chunks, vectors)
    with ctx.redis.pipeline() as pipe:
        pipe.sadd(keys.parts_written(batch_id), part)
        pipe.expire(keys.parts_written(batch_id), ctx.settings.payload_ttl_s)
        pipe.scard(keys.parts_written(batch_id))
        pipe.hget(keys.batch_plan(batch_id), "parts")
        written, parts = pipe.execute()[2:]
    ctx.ledger.incr(chunks_written=len(chunks))
    log.info("write %s/%d: %d chunks", batch_id, part, len(chunks))
    if parts is not None and written >= int(parts):
        finalize(batch_id)
    return {"chunks": len(chunks)}


def finalize(batch_id: str) -> None:
    """Every part of the batch is stored: remove stale chunks, then record the documents as done."""
    import msgpack

    from shared import keys
    from workers.runtime import context

    ctx = context()
    plan = ctx.redis.hgetall(keys.batch_plan(batch_id))
    expected = {k.decode()[4:]: msgpack.unpackb(v) for k, v in plan.items() if k.startswith(b"doc:")}
    stale = delete_stale(ctx.store, expected)
    if ctx.redis.set(keys.batch_finalized(batch_id), 1, nx=True, ex=ctx.settings.payload_ttl_s):
        with ctx.redis.pipeline() as pipe:
            ctx.ledger.clear_dead(expected, pipe=pipe)
            ctx.ledger.incr(pipe=pipe, documents_done=len(expected))
            pipe.delete(*keys.batch_keys(batch_id, int(plan.get(b"parts", 0))))
            pipe.execute()
    log.info("batch %s done: %d documents, %d stale chunks deleted", batch_id, len(expected), stale)
