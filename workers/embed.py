"""Embed stage: chunk texts -> normalised float32 vectors with sentence-transformers.

The model is loaded once per process by `Embedder.warm_up()`, never at import and never per job.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from shared.messages import Chunk
from shared.metrics import EMBED_JOB_SECONDS, observe_micro_batch
from shared.models import resolve_model_path

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


def embed_batch(chunks: list[Chunk], embedder: Embedder) -> np.ndarray:
    """One vector per chunk, in chunk order. The part is sorted by length and cut into micro-batches
    of embedder.batch_size, so each batch pads little; each micro-batch is measured."""
    vectors = np.zeros((len(chunks), embedder.dimension), dtype=np.float32)
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i].tokens)
    for start in range(0, len(order), embedder.batch_size):
        rows = order[start : start + embedder.batch_size]
        started = time.perf_counter()
        vectors[rows] = embedder.embed([chunks[i].text for i in rows])
        observe_micro_batch(time.perf_counter() - started, len(rows), [chunks[i].tokens for i in rows])
    return vectors


def embed_job(batch_id: str, part: int) -> dict[str, int]:
    """rq job: embed one part and hand the vectors to the write stage."""
    from shared import keys
    from shared.messages import decode_chunks
    from workers.runtime import context, enqueue_next

    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    chunks = decode_chunks(ctx.redis.get(keys.chunks(batch_id, part)))
    started = time.perf_counter()
    vectors = embed_batch(chunks, ctx.embedder)
    seconds = time.perf_counter() - started
    EMBED_JOB_SECONDS.observe(seconds)
    with ctx.redis.pipeline() as pipe:
        pipe.set(keys.vectors(batch_id, part), vectors.tobytes(), ex=ctx.settings.payload_ttl_s)
        enqueue_next(ctx, "write", [(batch_id, part)], pipe)
        pipe.execute()
    log.info(
        "embed %s/%d: %d chunks in %.2f s (%.1f chunks/s)",
        batch_id,
        part,
        len(chunks),
        seconds,
        len(chunks) / max(seconds, 1e-9),
    )
    return {"chunks": len(chunks)}
