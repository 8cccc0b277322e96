"""Embed stage: chunk texts -> normalised float32 vectors with sentence-transformers.

The model is loaded once per process by `Embedder.warm_up()`, never at import and never per job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from shared.cache import VectorCache, text_key
from shared.errors import EmbedFailures
from shared.messages import Chunk, DeadLetter
from shared.metrics import EMBED_CACHE, EMBED_JOB_SECONDS, observe_micro_batch
from shared.models import is_api_model, resolve_model_path
from shared.settings import Settings
from shared.spec import EmbeddingSpec

log = logging.getLogger(__name__)

STAGE = "embed"


class Embedder:
    def __init__(self, model: str, device: str = "auto", batch_size: int = 16, dimensions: int = 0) -> None:
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.dimensions = dimensions  # > 0: keep the first N dimensions, re-normalised
        self._model = None
        self.dimension = 0

    @property
    def ready(self) -> bool:
        return self._model is not None

    def warm_up(self) -> Embedder:
        """Load the model (idempotent): CUDA with fp16 where present, else CPU."""
        if self._model is not None:
            return self
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI shows its own progress

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        model = SentenceTransformer(str(resolve_model_path(self.model_name)), device=device, local_files_only=True)
        if device.startswith("cuda"):
            model.half()
        self._model = model
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(dimension() or 0)
        if 0 < self.dimensions < self.dimension:
            self.dimension = self.dimensions
        log.info("model %s on %s loaded in %.1f s", self.model_name, device, time.perf_counter() - started)
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("Embedder.embed() before warm_up(): the model is not loaded")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        if self.dimension < vectors.shape[1]:  # truncate, then back onto the unit sphere
            vectors = vectors[:, : self.dimension]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


    def embed_chunks(self, chunks: list[Chunk]) -> np.ndarray:
        """One vector per chunk, in chunk order. The part is sorted by length and cut into
        micro-batches of batch_size, so each batch pads little; each micro-batch is measured."""
        vectors = np.zeros((len(chunks), self.dimension), dtype=np.float32)
        order = sorted(range(len(chunks)), key=lambda i: -chunks[i].tokens)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            started = time.perf_counter()
            vectors[rows] = self.embed([chunks[i].text for i in rows])
            observe_micro_batch(time.perf_counter() - started, len(rows), [chunks[i].tokens for i in rows])
        return vectors


def make_embedder(settings: Settings, redis: Any = None) -> Embedder:
    """The embedder the settings name: a local sentence-transformers model, or `openai:NAME` behind an
    OpenAI-compatible API (whose rate budget is shared through `redis` when there is one)."""
    if is_api_model(settings.model):
        from workers.embed_api import ApiEmbedder

        return ApiEmbedder(settings, redis)  # type: ignore[return-value]
    return Embedder(settings.model, settings.device, settings.batch_size, settings.dimensions)


def embed_batch(chunks: list[Chunk], embedder: Embedder) -> np.ndarray:
    """One vector per chunk, in chunk order (each kind of embedder batches in its own way)."""
    return embedder.embed_chunks(chunks)


def embed_part(
    chunks: list[Chunk], embedder: Embedder, spec: EmbeddingSpec, cache: VectorCache | None
) -> tuple[np.ndarray, dict[int, str], int]:
    """Vectors of a part: from the cache where the spec already embedded the same text, from the
    model otherwise (each distinct text once). Returns the vectors, {row: message} of chunks the
    model refused for good (their rows are zeros), and how many texts went to the model."""
    texts = [spec.prefix + c.text for c in chunks]
    keys = [text_key(spec.fingerprint, t) for t in texts]
    found = cache.get_many(sorted(set(keys)), embedder.dimension) if cache is not None and embedder.dimension else {}
    todo: dict[str, int] = {}  # distinct key -> first row that needs it
    for row, key in enumerate(keys):
        if key not in found:
            todo.setdefault(key, row)
    EMBED_CACHE.labels("hit").inc(len(chunks) - len(todo))
    EMBED_CACHE.labels("miss").inc(len(todo))
    rows = list(todo.values())
    batch = [replace(chunks[r], text=texts[r]) for r in rows]
    failed_new: dict[int, str] = {}
    try:
        new = embed_batch(batch, embedder) if batch else np.zeros((0, embedder.dimension), dtype=np.float32)
    except EmbedFailures as e:
        new, failed_new = np.asarray(e.vectors, dtype=np.float32), e.failed
    vectors = np.zeros((len(chunks), embedder.dimension), dtype=np.float32)
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


def model_error_letters(chunks: list[Chunk], failed: dict[int, str], docs: dict[str, Any]) -> list[DeadLetter]:
    """One dead letter per document with a chunk the model refused; its clean text kept for redrive."""
    messages: dict[str, str] = {}
    for row, message in sorted(failed.items()):
        messages.setdefault(chunks[row].doc_id, f"chunk {chunks[row].index}: {message}")
    return [
        DeadLetter(doc_id, STAGE, "model_error", message, source=docs.get(doc_id))
        for doc_id, message in sorted(messages.items())
    ]


def embed_job(batch_id: str, part: int) -> dict[str, int]:
    """rq job: embed one part and hand the vectors to the write stage."""
    from shared import keys
    from shared.messages import decode_chunks, decode_documents
    from workers.runtime import check_spec, context, enqueue_next

    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    check_spec(ctx, batch_id)
    chunks = decode_chunks(ctx.redis.get(keys.chunks(batch_id, part)))
    started = time.perf_counter()
    vectors, failed, _ = embed_part(chunks, ctx.embedder, ctx.spec, ctx.cache)
    seconds = time.perf_counter() - started
    EMBED_JOB_SECONDS.observe(seconds)
    with ctx.redis.pipeline() as pipe:
        if failed:
            docs = {d.id: d for d in decode_documents(ctx.redis.get(keys.documents(batch_id)))}
            sources = {i: {"id": i, "text": d.text, "metadata": d.metadata} for i, d in docs.items()}
            letters = model_error_letters(chunks, failed, sources)
            ctx.ledger.add_dead(letters, pipe=pipe)
            pipe.sadd(keys.docs_failed(batch_id), *[d.doc_id for d in letters])
            pipe.expire(keys.docs_failed(batch_id), ctx.settings.payload_ttl_s)
        pipe.set(keys.vectors(batch_id, part), vectors.tobytes(), ex=ctx.settings.payload_ttl_s)
        enqueue_next(ctx, "write", [(batch_id, part)], pipe)
        pipe.execute()
    log.info("embed %s/%d: %d chunks in %.2f s, %d refused", batch_id, part, len(chunks), seconds, len(failed))
    return {"chunks": len(chunks), "failed": len(failed)}
