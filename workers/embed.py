"""Embed stage: chunk texts -> normalised float32 vectors, part by part, from the embedding cache where
the spec already embedded a text, from the model otherwise (workers/embedder.py; API models:
workers/embed_api.py). `embed_part` is the batch function; `embed_job` is the rq job around it.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import numpy.typing as npt
from redis import Redis
from rq import Retry

from shared.cache import VectorCache, text_key
from shared.embedding import Embedder
from shared.errors import EmbedFailures, RateLimited
from shared.messages import Chunk, DeadLetter, Document
from shared.metrics import (
    EMBED_CACHE,
    EMBED_JOB_SECONDS,
    RATE_LIMIT_RESCHEDULES,
)
from shared.models import is_api_model
from shared.settings import Settings
from shared.spec import EmbeddingSpec
from workers.batch_redis import RedisBatch
from workers.context import JobReport, WorkerContext, stage_job
from workers.embed_api import ApiEmbedder
from workers.embedder import LocalEmbedder

log = logging.getLogger(__name__)

STAGE = "embed"


def make_embedder(settings: Settings, redis: Redis | None = None) -> Embedder:
    """The embedder the settings name, not warmed up yet: a local sentence-transformers model, or
    `openai:NAME` behind an OpenAI-compatible API (whose rate budget is shared through `redis` when
    there is one)."""
    if is_api_model(settings.model):
        return ApiEmbedder(settings, redis)
    return LocalEmbedder(
        settings.model,
        settings.device,
        settings.batch_size,
        settings.dimensions,
        settings.backend,
        settings.micro_batch_tokens,
    )


def embed_part(
    chunks: list[Chunk], embedder: Embedder, spec: EmbeddingSpec, cache: VectorCache | None
) -> tuple[npt.NDArray[np.float32], dict[int, str], int]:
    """Vectors of a part: from the cache where the spec already embedded the same text, from the
    model otherwise (each distinct text once). Returns the vectors, {row: message} of chunks the
    model refused for good (their rows are zeros), and how many texts went to the model."""
    texts = [c.model_text(spec.prefix) for c in chunks]
    keys = [text_key(spec.fingerprint, t) for t in texts]
    found = cache.get_many(sorted(set(keys)), embedder.dimension) if cache is not None and embedder.dimension else {}
    todo: dict[str, int] = {}  # distinct key -> first row that needs it
    for row, key in enumerate(keys):
        if key not in found:
            todo.setdefault(key, row)
    EMBED_CACHE.labels("hit").inc(len(chunks) - len(todo))
    EMBED_CACHE.labels("miss").inc(len(todo))
    rows = list(todo.values())
    batch = [chunks[r] for r in rows]
    failed_new: dict[int, str] = {}
    try:
        empty = np.zeros((0, embedder.dimension), dtype=np.float32)
        new = embedder.embed_chunks(batch, spec.prefix) if batch else empty
    except EmbedFailures as e:
        new, failed_new = np.asarray(e.vectors, dtype=np.float32), e.failed
    except RateLimited as e:  # keep what the API did embed: the part comes back later for the rest
        if cache is not None and e.done:
            done = np.asarray(e.vectors, dtype=np.float32)
            if spec.vector_dtype == "float16":
                done = done.astype(np.float16).astype(np.float32)
            cache.put_many({keys[rows[i]]: done[i] for i in e.done})
        raise
    if spec.vector_dtype == "float16":  # what the writer will receive, here too: both runtimes, the cache
        new = new.astype(np.float16).astype(np.float32)
    # an API model of unknown size learns its dimension from its first response
    vectors = np.zeros((len(chunks), new.shape[1] if rows else embedder.dimension), dtype=np.float32)
    by_key = dict(found)
    by_key.update({keys[r]: new[i] for i, r in enumerate(rows) if i not in failed_new})
    failed = {}
    for row, key in enumerate(keys):
        if key in by_key:
            vectors[row] = by_key[key]
        else:
            failed[row] = failed_new[rows.index(todo[key])]
    if cache is not None:
        cache.put_many({keys[r]: new[i] for i, r in enumerate(rows) if i not in failed_new})
    return vectors, failed, len(rows)


def model_error_letters(chunks: list[Chunk], failed: dict[int, str], docs: list[Document]) -> list[DeadLetter]:
    """One dead letter per document with a chunk the model refused; its clean text kept for redrive."""
    sources = {d.id: {"id": d.id, "text": d.text, "metadata": d.metadata} for d in docs}
    messages: dict[str, str] = {}
    for row, message in sorted(failed.items()):
        messages.setdefault(chunks[row].doc_id, f"chunk {chunks[row].index}: {message}")
    return [
        DeadLetter(doc_id, STAGE, "model_error", message, source=sources.get(doc_id))
        for doc_id, message in sorted(messages.items())
    ]


RATE_LIMIT_MAX_RESCHEDULES = 100_000  # rescheduled for a rate limit this often, a job fails (weeks of waiting)


@stage_job(STAGE)
def embed_job(ctx: WorkerContext, batch: RedisBatch, part: int) -> JobReport | Retry:
    """rq job: embed one part and hand the vectors to the write stage."""
    chunks = batch.chunks(part)
    started = time.perf_counter()
    try:
        vectors, failed, _ = embed_part(chunks, ctx.embedder, ctx.spec, ctx.cache)
    except RateLimited as e:  # a rate limit delays the job, never fails it: rescheduled, retries unspent
        RATE_LIMIT_RESCHEDULES.labels(ctx.spec.model).inc()
        log.warning("embed %s/%d: %s; back in %.0f s", batch.id, part, e, e.retry_in_s)
        return Retry(max=RATE_LIMIT_MAX_RESCHEDULES, interval=max(1, math.ceil(e.retry_in_s)))
    EMBED_JOB_SECONDS.observe(time.perf_counter() - started)
    letters = model_error_letters(chunks, failed, batch.documents()) if failed else []
    with ctx.redis.pipeline() as pipe:
        batch.record_refused(letters, pipe)
        batch.put_vectors(part, vectors, ctx.spec.vector_dtype, pipe)
        ctx.enqueue_next("write", [(batch.id, part)], pipe)
        pipe.execute()
    return {"chunks": len(chunks), "chunks_refused": len(failed)}
