"""Embedded mode: the same stage functions in one process, no Redis, any store (a directory or pgvector).

Loading and chunking run in one thread, writing in another, so the model (main thread) never waits
for them; bounded queues between them keep memory flat. torch is imported only when there is
something to embed. Each batch's bookkeeping is workers/batch.py's, in memory (MemoryBatch), exactly
as the distributed jobs keep it in Redis; dead letters and counters live beside the store (LocalLedger).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shared.cache import LocalVectorCache
from shared.embedding import Embedder
from shared.errors import RateLimited
from shared.ledger import LocalLedger, local_ledger_path
from shared.messages import Chunk, DeadLetter, SourceDoc, batched_by_size
from shared.settings import Settings
from shared.spec import EmbeddingSpec, chunk_policy, spec_for
from shared.store import Store, open_store
from shared.tokenizers import load_tokenizer
from workers.batch import MemoryBatch
from workers.chunk import plan_batch
from workers.embed import embed_part, make_embedder, model_error_letters
from workers.embedder import LocalEmbedder
from workers.fetch import FetchPolicy
from workers.load import load_batch
from workers.write import finalize_batch, write_part

log = logging.getLogger(__name__)

QUEUE_PARTS = 4  # parts waiting between stages: enough to keep the model busy, little memory
EMBEDDED_RATE_WAIT_CAP_S = 60.0  # a rate limit is waited out in steps of at most this, then asked again
_DONE = object()


class Progress(Protocol):
    """A tqdm-like bar over documents. Its total is counted up front by the caller (0: unknown, then it
    grows batch by batch); a document with nothing to embed moves it when it is chunked, one with
    chunks by its share of them as each micro-batch is embedded."""

    total: float | None
    n: float

    def refresh(self) -> None: ...
    def update(self, n: float = 1) -> bool | None: ...
    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None: ...


@dataclass
class RunSummary:
    documents: int = 0  # submitted
    documents_stored: int = 0
    unchanged: int = 0  # held by the store with the same text: skipped before chunking
    failed: int = 0
    chunks: int = 0
    chunks_embedded: int = 0  # by the model; the rest came from the embedding cache
    chunks_cached: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    model_load_seconds: float = 0.0
    chunks_per_s: float = 0.0
    store: str = ""
    collection: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_embedded(
    settings: Settings,
    items: Iterable[SourceDoc | DeadLetter],
    embedder: Embedder | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Load, chunk, embed and write `items` into the local store under these settings; unchanged
    documents are skipped, cached chunks not embedded again. `embedder` (warmed up or not) is used
    instead of a new one; it is warmed up only if something must be embedded."""
    spec = spec_for(settings)
    store = open_store(settings.store, spec, settings=settings)
    state = settings.local_state_dir  # beside a directory store; a user's directory for a server store
    cache = LocalVectorCache(state / "embedpipe-cache.sqlite", settings.cache_max_entries, settings.cache_ttl_s)
    run = _Run(settings, spec, store, LocalLedger(local_ledger_path(state)), cache, progress)
    try:
        return run.run(items, embedder or make_embedder(settings))
    finally:
        cache.close()
        store.close()


class _Run:
    """One embedded run's threads and what they share."""

    def __init__(
        self,
        settings: Settings,
        spec: EmbeddingSpec,
        store: Store,
        ledger: LocalLedger,
        cache: LocalVectorCache,
        progress: Progress | None,
    ) -> None:
        self.settings, self.spec, self.store, self.ledger, self.cache = settings, spec, store, ledger, cache
        self.tokenizer = load_tokenizer(settings.model, settings.api_max_input_tokens)
        self.policy = chunk_policy(settings, self.tokenizer)
        self.fetch_policy = FetchPolicy.parse(settings.fetch_allow)
        self.progress = progress
        self.growing = progress is not None and not progress.total  # no total counted up front
        self.phase = ""
        self.chunks_of: dict[str, int] = {}  # each document's chunks, for its share of the bar
        self.summary = RunSummary(store=settings.store_redacted, collection=spec.collection)
        self.errors: list[BaseException] = []
        self.submitted: set[str] = set()

    def run(self, items: Iterable[SourceDoc | DeadLetter], embedder: Embedder) -> RunSummary:
        started = time.perf_counter()
        parts: queue.Queue[Any] = queue.Queue(QUEUE_PARTS)
        embedded: queue.Queue[Any] = queue.Queue(QUEUE_PARTS)
        prepare = threading.Thread(target=self._guard, args=(self._prepare, items, parts), daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write, embedded), daemon=True)
        prepare.start()
        writer.start()
        try:
            while (item := parts.get()) is not _DONE and not self.errors:
                batch, number, part = item
                if not embedder.ready:
                    loading = time.perf_counter()
                    self._say("loading the model")
                    embedder.warm_up()
                    self.summary.model_load_seconds = round(time.perf_counter() - loading, 3)
                self._say("embedding")
                with self._moving(part, embedder):
                    vectors, refused, embedded_now = self._embed(part, embedder)
                self.summary.chunks_embedded += embedded_now
                self.summary.chunks_cached += len(part) - embedded_now
                if refused:
                    batch.record_refused(model_error_letters(part, refused, batch.documents()))
                embedded.put((batch, number, part, vectors))
        finally:
            embedded.put(_DONE)
            writer.join()
        if self.errors:
            raise self.errors[0]
        self.summary.failed = len({d.doc_id for d in self.ledger.dead()} & self.submitted)
        self.store.optimize()
        self.summary.seconds = round(time.perf_counter() - started, 3)
        self.summary.chunks_per_s = round(self.summary.chunks_embedded / max(self.summary.seconds, 1e-9), 2)
        return self.summary

    def _say(self, phase: str) -> None:
        if self.progress is not None and phase != self.phase:
            self.phase = phase
            self.progress.set_description_str(phase)

    @contextlib.contextmanager
    def _moving(self, part: list[Chunk], embedder: Embedder) -> Iterator[None]:
        """Move the bar by the part's share of its documents: per micro-batch where the embedder says
        them (the local model), the rest (cached chunks, an API model) once the part is embedded."""
        if self.progress is None:
            yield
            return
        progress, share = self.progress, sum(1 / self.chunks_of[c.doc_id] for c in part)
        moved = 0.0

        def advance(step: float) -> None:
            nonlocal moved
            moved += step
            if not self.growing and progress.total:  # shares are floats: never past the total
                step = min(step, progress.total - progress.n)
            progress.update(step)

        def micro_batch(texts: int) -> None:
            advance(min(share - moved, share * texts / len(part)))

        local = embedder if isinstance(embedder, LocalEmbedder) else None
        if local is not None:
            local.on_micro_batch = micro_batch
        try:
            yield
        finally:
            if local is not None:
                local.on_micro_batch = None
            advance(share - moved)

    def _embed(self, part: list[Chunk], embedder: Embedder) -> tuple[npt.NDArray[np.float32], dict[int, str], int]:
        """embed_part, waiting out rate limits here (what the distributed mode does by rescheduling);
        what the API did embed before a limit is kept in the cache, so it is not sent twice."""
        while True:
            try:
                return embed_part(part, embedder, self.spec, self.cache)
            except RateLimited as e:
                log.warning("%s; waiting %.0f s", e, e.retry_in_s)
                time.sleep(min(e.retry_in_s, EMBEDDED_RATE_WAIT_CAP_S))

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self.errors.append(e)
            if target == self._prepare:
                args[-1].put(_DONE)

    def _prepare(self, items: Iterable[SourceDoc | DeadLetter], parts: queue.Queue[Any]) -> None:
        s = self.settings
        for group in batched_by_size(items, s.batch_docs, s.batch_bytes):
            rejected = [i for i in group if isinstance(i, DeadLetter)]
            sources = [i.to_dict() for i in group if isinstance(i, SourceDoc)]
            loaded, dead = load_batch(sources, s.max_doc_bytes, self.fetch_policy)
            self.ledger.add_dead(rejected + dead)
            planned = plan_batch(loaded, self.store, self.tokenizer, self.policy, s, self.spec.fingerprint)
            chunks = planned.chunks
            self.submitted |= {i.id if isinstance(i, SourceDoc) else i.doc_id for i in group}
            self.summary.documents += len(group)
            self.summary.unchanged += len(planned.plan.unchanged)
            self.summary.chunks += len(chunks)
            self.summary.tokens += sum(c.tokens for c in chunks)
            for c in chunks:
                self.chunks_of[c.doc_id] = self.chunks_of.get(c.doc_id, 0) + 1
            if self.progress is not None:
                if self.growing:
                    self.progress.total = (self.progress.total or 0) + len(group)
                self.progress.update(len(group) - len({c.doc_id for c in chunks}))  # nothing to embed
            batch = MemoryBatch(planned.plan, planned.docs, self.ledger)
            if not planned.parts:  # nothing to embed: the batch is complete now
                self._finish(batch)
            for number, part in enumerate(planned.parts):
                parts.put((batch, number, part))
        parts.put(_DONE)

    def _write(self, embedded: queue.Queue[Any]) -> None:
        while (item := embedded.get()) is not _DONE:
            batch, number, part, vectors = item
            write_part(batch, self.store, number, part, vectors)
            if batch.accounted():
                self._finish(batch)

    def _finish(self, batch: MemoryBatch) -> None:
        """All parts of the batch are written: record its documents, delete what is stale, count it."""
        result = finalize_batch(batch, self.store)
        if result is not None:
            self.summary.documents_stored += len(result.done)
